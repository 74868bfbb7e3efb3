"""What was indexed for a document, kept for people to inspect: the extracted text of its
live version and that version's chunks (offsets into the text, page, heading path, token
count, instruction-like reasons).

The pipeline computes the rows off the event loop (`chunk_rows`) and `keep` writes them
in the transaction that makes the version live, replacing the previous version's, so
what is kept is always exactly what search serves. `IndexedService` reads them for the
document detail routes, inside the tenant's row-level-security scope; a document with
no live version yet is a 409 that names its status.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.indexed import DocumentChunk, DocumentText
from app.db.models import Document, DocumentStatus
from app.domain.knowledge.schemas import ChunkOut, ChunkPage, DocumentTextOut
from app.errors import BadRequestError, ConflictError, NotFoundError
from ingestion import Chunk, instruction_reasons

CURSOR_PATTERN = r"^[1-9][0-9]{0,8}\.[0-9]{1,9}$"  # "<version>.<next chunk index>"
_CURSOR = re.compile(CURSOR_PATTERN)
INSERT_BATCH = 1000


class DocumentNotReadyError(ConflictError):
    """Nothing of the asked version is indexed yet (queued, processing or failed)."""

    code = "document_not_ready"
    title = "Document not ready"


class IndexedNotKeptError(ConflictError):
    """The live version was indexed before extracted text was kept (migration 0012)."""

    code = "indexed_text_not_kept"
    title = "Indexed text not kept"


class CursorExpiredError(ConflictError):
    """The version a cursor pages through was replaced while paging."""

    code = "cursor_expired"
    title = "Cursor expired"


@dataclass(frozen=True)
class Extracted:
    """One parsed version: its text and the chunks whose offsets point into it."""

    text: str
    chunks: list[Chunk]

    @property
    def tokens(self) -> int:
        """Tokens of every chunk, as embedded (and metered)."""
        return sum(c.token_count for c in self.chunks)


def chunk_rows(tenant_id: uuid.UUID, document_id: uuid.UUID, version: int,
               chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
    """The ``document_chunks`` rows of one version (the instruction checks take CPU
    time: call it off the event loop)."""
    return [{"document_id": document_id, "version": version, "chunk_index": c.index,
             "tenant_id": tenant_id, "text": c.text, "char_start": c.start,
             "char_end": c.end, "page": c.page, "heading_path": list(c.heading_path),
             "token_count": c.token_count, "instruction_reasons": instruction_reasons(c.text)}
            for c in chunks]


async def keep(session: AsyncSession, doc: Document, text: str,
               rows: Sequence[dict[str, Any]]) -> None:
    """Replace what is kept for ``doc`` by its version's text and chunk rows (inside the
    publishing transaction: the kept version is always the live one)."""
    conn = await session.connection()
    await conn.execute(delete(DocumentChunk).where(col(DocumentChunk.document_id) == doc.id))
    await conn.execute(delete(DocumentText).where(col(DocumentText.document_id) == doc.id))
    await conn.execute(insert(DocumentText).values(
        document_id=doc.id, version=doc.version, tenant_id=doc.tenant_id, text=text))
    for start in range(0, len(rows), INSERT_BATCH):
        await conn.execute(insert(DocumentChunk), list(rows[start:start + INSERT_BATCH]))


def make_cursor(version: int, next_index: int) -> str:
    """The opaque cursor of the page that starts at ``next_index`` of ``version``."""
    return f"{version}.{next_index}"


def read_cursor(cursor: str) -> tuple[int, int]:
    """(version, next chunk index) of a cursor this API made; 400 for anything else."""
    if not _CURSOR.match(cursor):
        raise BadRequestError("cursor is not one this API returned (use next_cursor as is)")
    version, index = cursor.split(".")
    return int(version), int(index)


class IndexedService:
    """Reads a document's kept text and chunks for the tenant's keys."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def chunks(self, tenant_id: uuid.UUID, kb_id: uuid.UUID, doc_id: uuid.UUID,
                     version: int | None, cursor: str | None, limit: int) -> ChunkPage:
        """One page of the version's chunks in order; ``next_cursor`` is None at the end."""
        pinned, first = (None, 0) if cursor is None else read_cursor(cursor)
        if pinned is not None and version is not None and version != pinned:
            raise BadRequestError(f"the cursor pages through version {pinned}, "
                                  f"not version {version}")
        async with self.db.tenant(tenant_id) as session:
            doc, version = await _kept_version(session, kb_id, doc_id, version, pinned)
            await _text_row_exists(session, doc, version)
            query = (select(DocumentChunk)
                     .where(col(DocumentChunk.document_id) == doc_id,
                            col(DocumentChunk.version) == version,
                            col(DocumentChunk.chunk_index) >= first)
                     .order_by(col(DocumentChunk.chunk_index)).limit(limit + 1))
            rows = list((await session.exec(query)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return ChunkPage(
            document_id=doc_id, version=version, chunk_count=doc.chunk_count or 0, limit=limit,
            next_cursor=make_cursor(version, rows[-1].chunk_index + 1) if more else None,
            data=[ChunkOut(**r.model_dump(exclude={"document_id", "version", "tenant_id"}),
                           suspected_instructions=bool(r.instruction_reasons)) for r in rows])

    async def text(self, tenant_id: uuid.UUID, kb_id: uuid.UUID, doc_id: uuid.UUID,
                   version: int | None, start: int, end: int | None) -> DocumentTextOut:
        """The version's extracted text, or its ``[start, end)`` characters."""
        if end is not None and end < start:
            raise BadRequestError(f"end ({end}) is before start ({start})")
        piece = (func.substr(DocumentText.text, start + 1) if end is None
                 else func.substr(DocumentText.text, start + 1, end - start))
        async with self.db.tenant(tenant_id) as session:
            doc, version = await _kept_version(session, kb_id, doc_id, version, None)
            found = (await session.exec(
                select(func.length(DocumentText.text), piece)
                .where(col(DocumentText.document_id) == doc_id,
                       col(DocumentText.version) == version))).first()
        if found is None:
            raise _not_kept(doc, version)
        length, text = found
        start = min(start, length)
        return DocumentTextOut(document_id=doc_id, version=version, format=doc.format,
                               length=length, start=start, end=start + len(text), text=text)


async def _kept_version(session: AsyncSession, kb_id: uuid.UUID, doc_id: uuid.UUID,
                        version: int | None, pinned: int | None) -> tuple[Document, int]:
    """The document and the version to read: the live one unless another is asked for;
    only the live version is kept."""
    # FOR SHARE: a publish waits until this read is done, so the version stays kept.
    doc = await session.get(Document, doc_id, with_for_update={"read": True})
    if doc is None or doc.kb_id != kb_id:
        raise NotFoundError(f"document {doc_id} not found in knowledge base {kb_id}")
    wanted = pinned or version or doc.live_version
    if wanted is not None and wanted == doc.live_version:
        return doc, wanted
    if pinned is not None:
        raise CursorExpiredError(
            f"the cursor pages through version {pinned}, which is no longer stored "
            f"(live version: {doc.live_version}); start again without a cursor",
            live_version=doc.live_version)
    if wanted is None or (wanted == doc.version and doc.status != DocumentStatus.ready):
        raise DocumentNotReadyError(_not_ready(doc, wanted), document_status=str(doc.status),
                                    live_version=doc.live_version)
    live = f"only the live version ({doc.live_version}) is" if doc.live_version else "none is"
    raise NotFoundError(f"version {wanted} of document {doc_id} is not stored: {live} kept")


def _not_ready(doc: Document, version: int | None) -> str:
    which = f"version {version} of document {doc.id}" if version else f"document {doc.id}"
    if doc.status == DocumentStatus.failed:
        return f"{which} failed, nothing of it is indexed: {doc.error}"
    return (f"{which} is {doc.status}: its chunks and extracted text can be read "
            "once it is ready")


async def _text_row_exists(session: AsyncSession, doc: Document, version: int) -> None:
    found = await session.exec(select(col(DocumentText.version)).where(
        col(DocumentText.document_id) == doc.id, col(DocumentText.version) == version))
    if found.first() is None:
        raise _not_kept(doc, version)


def _not_kept(doc: Document, version: int) -> IndexedNotKeptError:
    return IndexedNotKeptError(
        f"version {version} of document {doc.id} was indexed before extracted text and "
        "chunks were kept; delete it and upload it again to see them (the same bytes "
        "again are a duplicate and are not processed)")
