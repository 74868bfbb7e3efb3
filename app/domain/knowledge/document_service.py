"""Documents of one tenant: upload (validated, deduplicated, versioned), list, read, delete.

An upload stores the bytes, the ``documents`` row and an outbox message in ONE
transaction: either all of it exists or none of it, so a document can never be queued
without its message, nor a message sent for a document that was rolled back.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import Document, DocumentContent, DocumentStatus, Tenant, utcnow
from app.domain.audit.records import AuditAction, record_audit
from app.domain.knowledge import embedding_quota, unsettled
from app.domain.knowledge.kb_service import get_kb
from app.errors import (
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaError,
)
from app.outbox import DELETE_DOCUMENT_POINTS, INGEST_DOCUMENT, enqueue
from app.quotas.policy import check_storage
from app.settings import IngestSettings
from ingestion import (
    EmptyDocumentError,
    UnsafeDocumentError,
    UnsupportedFormatError,
    detect_format,
)


@dataclass(frozen=True)
class IncomingFile:
    """One file of an upload, as received."""

    filename: str
    data: bytes
    declared_type: str | None = None


@dataclass(frozen=True)
class CheckedFile:
    """A file that passed validation: its detected format and digest."""

    filename: str
    data: bytes
    format: str
    sha256: str


@dataclass(frozen=True)
class UploadOutcome:
    """One stored (or recognised) document, and whether it was a duplicate."""

    document: Document
    duplicate: bool


class DocumentService:
    """Upload and manage documents inside the tenant's row-level-security scope."""

    def __init__(self, db: Database, settings: IngestSettings) -> None:
        self.db = db
        self.settings = settings

    def check_files(self, files: list[IncomingFile], external_id: str | None) -> list[CheckedFile]:
        """Validate every file before anything is stored; the first problem is raised."""
        if not files:
            raise InvalidInputError("no file in the upload: send one or more 'file' parts")
        if len(files) > self.settings.max_files_per_request:
            raise InvalidInputError(
                f"{len(files)} files in one request; the limit is "
                f"{self.settings.max_files_per_request}"
            )
        if external_id is not None and len(files) > 1:
            raise InvalidInputError("external_id identifies one document: send one file with it")
        return [self._check(f) for f in files]

    def _check(self, f: IncomingFile) -> CheckedFile:
        limit = self.settings.max_file_bytes
        if len(f.data) > limit:
            raise PayloadTooLargeError(
                f"{f.filename!r} is {len(f.data)} bytes; the limit is {limit} bytes",
                filename=f.filename, limit_bytes=limit,
            )
        try:
            fmt = detect_format(f.data, f.filename, f.declared_type)
        except (EmptyDocumentError, UnsafeDocumentError) as exc:
            raise InvalidInputError(f"{f.filename!r}: {exc}", filename=f.filename) from exc
        except UnsupportedFormatError as exc:
            raise UnsupportedMediaError(
                f"{f.filename!r}: {exc}. Supported: PDF, DOCX, HTML, Markdown, plain text.",
                filename=f.filename,
            ) from exc
        return CheckedFile(f.filename, f.data, fmt, hashlib.sha256(f.data).hexdigest())

    async def upload(
        self,
        tenant_id: uuid.UUID,
        kb_id: uuid.UUID,
        files: list[CheckedFile],
        external_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[UploadOutcome]:
        """Store new documents or versions and queue them; recognise identical bytes."""
        outcomes = []
        async with self.db.tenant(tenant_id) as session:
            tenant = await session.get(Tenant, tenant_id, with_for_update=True)
            if tenant is None:
                raise NotFoundError(f"tenant {tenant_id} not found")
            await get_kb(session, kb_id)
            await _check_quotas(session, tenant, files)
            for f in files:
                outcome = await self._store(session, tenant_id, kb_id, f, external_id, metadata)
                outcomes.append(outcome)
        return outcomes

    async def _store(
        self, session: AsyncSession, tenant_id: uuid.UUID, kb_id: uuid.UUID,
        f: CheckedFile, external_id: str | None, metadata: dict[str, Any] | None,
    ) -> UploadOutcome:
        existing = await _find_existing(session, kb_id, f.sha256, external_id)
        if (existing is not None and existing.sha256 == f.sha256
                and not embedding_quota.failed_for_quota(existing)):
            return UploadOutcome(existing, duplicate=True)
        doc = existing or Document(tenant_id=tenant_id, kb_id=kb_id, external_id=external_id,
                                   filename=f.filename, format=f.format, size_bytes=0,
                                   sha256=f.sha256, version=0)
        now = utcnow()
        doc.version += 1
        doc.filename, doc.format, doc.sha256 = f.filename, f.format, f.sha256
        doc.size_bytes, doc.doc_metadata = len(f.data), dict(metadata or {})
        doc.status, doc.error, doc.attempts = DocumentStatus.queued, None, 0
        doc.queued_at = doc.updated_at = now
        session.add(doc)
        await session.flush()  # the next file of this request must see this one
        session.add(DocumentContent(document_id=doc.id, version=doc.version,
                                    tenant_id=tenant_id, data=f.data))
        enqueue(session, tenant_id, INGEST_DOCUMENT, document_id=str(doc.id),
                version=doc.version)
        return UploadOutcome(doc, duplicate=False)

    async def list(
        self, tenant_id: uuid.UUID, kb_id: uuid.UUID, limit: int, offset: int,
        status: DocumentStatus | None = None,
    ) -> tuple[list[Document], int]:
        """A page of the knowledge base's documents, newest first, and the total."""
        query = select(Document).where(Document.kb_id == kb_id)
        counter = select(func.count()).select_from(Document).where(Document.kb_id == kb_id)
        if status is not None:
            query = query.where(Document.status == status)
            counter = counter.where(col(Document.status) == status)
        query = query.order_by(col(Document.created_at).desc(), col(Document.id))
        async with self.db.tenant(tenant_id) as session:
            await get_kb(session, kb_id)
            rows = (await session.exec(query.limit(limit).offset(offset))).all()
            total = (await session.exec(counter)).one()
        return list(rows), total

    async def get(self, tenant_id: uuid.UUID, kb_id: uuid.UUID, doc_id: uuid.UUID) -> Document:
        """One document of the knowledge base, or NotFoundError."""
        async with self.db.tenant(tenant_id) as session:
            return await _get_document(session, kb_id, doc_id)

    async def delete(self, tenant_id: uuid.UUID, kb_id: uuid.UUID, doc_id: uuid.UUID,
                     actor: str) -> None:
        """Delete the document now; its vectors are removed by a queued job. Retrieval
        only matches documents that exist here, so it is never retrieved again."""
        async with self.db.tenant(tenant_id) as session:
            doc = await _get_document(session, kb_id, doc_id, lock=True)
            await unsettled.mark(session, tenant_id, doc_id, unsettled.DOCUMENT, kb_id)
            await session.delete(doc)
            enqueue(session, tenant_id, DELETE_DOCUMENT_POINTS, document_id=str(doc_id))
            record_audit(session, tenant_id, actor, AuditAction.document_deleted,
                         ("document", doc_id), {"kb_id": kb_id, "filename": doc.filename,
                                                "external_id": doc.external_id,
                                                "version": doc.version})


async def _get_document(
    session: AsyncSession, kb_id: uuid.UUID, doc_id: uuid.UUID, lock: bool = False
) -> Document:
    doc = await session.get(Document, doc_id, with_for_update=lock)
    if doc is None or doc.kb_id != kb_id:
        raise NotFoundError(f"document {doc_id} not found in knowledge base {kb_id}")
    return doc


async def _find_existing(
    session: AsyncSession, kb_id: uuid.UUID, sha256: str, external_id: str | None
) -> Document | None:
    """The document this upload updates (same external id) or repeats (same bytes)."""
    query = select(Document).where(Document.kb_id == kb_id)
    if external_id is not None:
        query = query.where(Document.external_id == external_id)
    else:
        query = query.where(Document.sha256 == sha256).order_by(col(Document.created_at))
    return (await session.exec(query.with_for_update().limit(1))).first()


async def _check_quotas(session: AsyncSession, tenant: Tenant, files: list[CheckedFile]) -> None:
    """Refuse the whole upload if it could push the tenant past a document or storage quota,
    or if its monthly embedding tokens are used up (the tenant row is locked, so
    concurrent uploads are counted one after another)."""
    await check_storage(session, tenant, [len(f.data) for f in files])
    await embedding_quota.refuse_if_used_up(session, tenant)
