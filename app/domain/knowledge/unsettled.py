"""The set of documents and knowledge bases whose vectors are not settled yet.

Search must only match each document's live version. Listing every live document in
the vector-store filter would grow with the knowledge base; instead PostgreSQL keeps the
(small) set of documents whose stored points may hold another version (one is being
ingested, replaced or deleted) and of knowledge bases being deleted. Search hides those
and lets every other point through. A row is added in the same transaction that starts
the change and removed only once the vector store holds nothing but the live version.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, delete, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.models import Document, UnsettledPoints, utcnow

DOCUMENT, KB = "document", "kb"


@dataclass(frozen=True)
class Unsettled:
    """What search must hide right now: per document the one version it may show
    (None: none), and knowledge bases being deleted."""

    documents: dict[uuid.UUID, int | None]
    kbs: list[uuid.UUID]


async def mark(
    session: AsyncSession, tenant_id: uuid.UUID, target_id: uuid.UUID, kind: str,
    kb_id: uuid.UUID,
) -> None:
    """Add a document or knowledge base to the set (idempotent), in the caller's
    transaction."""
    stmt = insert(UnsettledPoints).values(
        target_id=target_id, tenant_id=tenant_id, kind=kind, kb_id=kb_id, created_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=["target_id"])
    await (await session.connection()).execute(stmt)


async def settle(session: AsyncSession, target_id: uuid.UUID) -> None:
    """Remove a document or knowledge base from the set."""
    await (await session.connection()).execute(
        delete(UnsettledPoints).where(col(UnsettledPoints.target_id) == target_id))


async def settle_kb(session: AsyncSession, kb_id: uuid.UUID) -> None:
    """Remove a deleted knowledge base and all its documents from the set."""
    await (await session.connection()).execute(delete(UnsettledPoints).where(or_(
        col(UnsettledPoints.target_id) == kb_id, col(UnsettledPoints.kb_id) == kb_id)))


async def load(session: AsyncSession, kb_ids: Sequence[uuid.UUID] | None) -> Unsettled:
    """The tenant's unsettled set (of the given knowledge bases, if any)."""
    query = (select(UnsettledPoints.target_id, UnsettledPoints.kind, Document.live_version)
             .outerjoin(Document, col(Document.id) == col(UnsettledPoints.target_id)))
    if kb_ids:
        query = query.where(col(UnsettledPoints.kb_id).in_(kb_ids))
    documents: dict[uuid.UUID, int | None] = {}
    kbs: list[uuid.UUID] = []
    for target_id, kind, live_version in (await session.exec(query)).all():
        if kind == KB:
            kbs.append(target_id)
        else:
            documents[target_id] = live_version
    return Unsettled(documents=documents, kbs=kbs)
