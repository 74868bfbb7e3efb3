"""Knowledge bases of one tenant: create, list, read, rename, delete."""

from __future__ import annotations

import uuid

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import Document, KnowledgeBase, utcnow
from app.domain.audit.records import AuditAction, changed_fields, record_audit
from app.domain.knowledge import unsettled
from app.domain.knowledge.schemas import (
    KnowledgeBaseCreate,
    KnowledgeBaseOut,
    KnowledgeBaseUpdate,
)
from app.errors import ConflictError, InvalidInputError, NotFoundError
from app.outbox import DELETE_KB_POINTS, enqueue

KB_TARGET = "knowledge_base"


async def get_kb(session: AsyncSession, kb_id: uuid.UUID, lock: bool = False) -> KnowledgeBase:
    """The knowledge base in the session's tenant scope, or NotFoundError."""
    kb = await session.get(KnowledgeBase, kb_id, with_for_update=lock)
    if kb is None:
        raise NotFoundError(f"knowledge base {kb_id} not found")
    return kb


class KnowledgeBaseService:
    """Rules for knowledge bases; every call runs in the caller's tenant scope."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, tenant_id: uuid.UUID, data: KnowledgeBaseCreate,
                     actor: str) -> KnowledgeBaseOut:
        """Create a knowledge base; names are unique within a tenant."""
        kb = KnowledgeBase(tenant_id=tenant_id, name=data.name, description=data.description)
        try:
            async with self.db.tenant(tenant_id) as session:
                session.add(kb)
                record_audit(session, tenant_id, actor, AuditAction.knowledge_base_created,
                             (KB_TARGET, kb.id), {"name": kb.name, "description": kb.description})
        except IntegrityError as exc:
            raise ConflictError(f"a knowledge base named {data.name!r} already exists") from exc
        return KnowledgeBaseOut.model_validate(kb)

    async def list(self, tenant_id: uuid.UUID) -> list[KnowledgeBaseOut]:
        """All of the tenant's knowledge bases with their document counts, by name."""
        counts = (
            select(Document.kb_id, func.count().label("n"))
            .group_by(col(Document.kb_id))
            .subquery()
        )
        query = (
            select(KnowledgeBase, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.kb_id == col(KnowledgeBase.id))
            .order_by(col(KnowledgeBase.name))
        )
        async with self.db.tenant(tenant_id) as session:
            rows = (await session.exec(query)).all()
        return [_out(kb, n) for kb, n in rows]

    async def get(self, tenant_id: uuid.UUID, kb_id: uuid.UUID) -> KnowledgeBaseOut:
        """One knowledge base with its document count."""
        async with self.db.tenant(tenant_id) as session:
            kb = await get_kb(session, kb_id)
            n = (await session.exec(
                select(func.count()).select_from(Document).where(Document.kb_id == kb_id)
            )).one()
        return _out(kb, n)

    async def update(
        self, tenant_id: uuid.UUID, kb_id: uuid.UUID, data: KnowledgeBaseUpdate, actor: str
    ) -> KnowledgeBaseOut:
        """Rename and/or re-describe (audited as ``knowledge_base.renamed`` when the name
        changes, else ``knowledge_base.updated``; nothing when nothing changes)."""
        changes = data.model_dump(include=data.model_fields_set)
        if changes.get("name", "") is None or changes.get("description", "") is None:
            raise InvalidInputError("name and description cannot be null")
        try:
            async with self.db.tenant(tenant_id) as session:
                kb = await get_kb(session, kb_id, lock=True)
                changed = changed_fields(kb, changes)
                for field, value in changes.items():
                    setattr(kb, field, value)
                kb.updated_at = utcnow()
                session.add(kb)
                if changed:
                    action = (AuditAction.knowledge_base_renamed if "name" in changed
                              else AuditAction.knowledge_base_updated)
                    record_audit(session, tenant_id, actor, action, (KB_TARGET, kb_id),
                                 {"changes": changed})
        except IntegrityError as exc:
            raise ConflictError(f"a knowledge base named {data.name!r} already exists") from exc
        return await self.get(tenant_id, kb_id)

    async def delete(self, tenant_id: uuid.UUID, kb_id: uuid.UUID, actor: str) -> None:
        """Delete the knowledge base, its documents and (asynchronously) their vectors.

        The knowledge base joins the unsettled set in the same transaction, so search
        hides all of its points from the moment this commits until they are gone.
        """
        async with self.db.tenant(tenant_id) as session:
            kb = await get_kb(session, kb_id, lock=True)
            documents = (await session.exec(
                select(func.count()).select_from(Document).where(Document.kb_id == kb_id)
            )).one()
            await unsettled.mark(session, tenant_id, kb_id, unsettled.KB, kb_id)
            await session.delete(kb)
            record_audit(session, tenant_id, actor, AuditAction.knowledge_base_deleted,
                         (KB_TARGET, kb_id), {"name": kb.name, "documents": documents})
            enqueue(session, tenant_id, DELETE_KB_POINTS, kb_id=str(kb_id))


def _out(kb: KnowledgeBase, document_count: int) -> KnowledgeBaseOut:
    out = KnowledgeBaseOut.model_validate(kb)
    out.document_count = document_count
    return out
