"""Hybrid retrieval over the authenticated tenant's own store, live versions only.

Which version of each document is live comes from PostgreSQL at query time, so a
version swap is atomic for readers (the old version until the new one is published)
and a deleted document is never matched, even before its vectors are removed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from sqlmodel import col, select

from app.db.engine import Database
from app.db.models import Document, KnowledgeBase
from app.domain.search.schemas import FilterValue, RetrievedChunk, SearchMode
from app.embeddings import Models
from app.errors import NotFoundError
from retrieval.vectorstore import (
    HybridQuery,
    PointFilter,
    ScoredChunk,
    SparseVector,
    VectorStore,
)

PREFETCH_FACTOR = 5
MIN_PREFETCH = 50


class SearchService:
    """Finds the passages of a tenant's documents that best match a query."""

    def __init__(self, db: Database, store: VectorStore, models: Models) -> None:
        self.db = db
        self.store = store
        self.models = models

    async def search(
        self, tenant_id: uuid.UUID, query: str, kb_ids: Sequence[uuid.UUID] | None = None,
        top_k: int = 5, filters: dict[str, FilterValue] | None = None,
        mode: SearchMode = "hybrid",
    ) -> list[RetrievedChunk]:
        """Top passages, best first; [] when nothing is live in those knowledge bases."""
        live = await self.live_versions(tenant_id, kb_ids)
        if not live:
            return []
        dense, sparse = await asyncio.to_thread(self._encode, query, mode)
        flt = PointFilter(kb_ids=list(kb_ids) if kb_ids else None,
                          document_versions=live, metadata=filters or None)
        q = HybridQuery(dense=dense, sparse=sparse, filter=flt, limit=top_k,
                        prefetch_limit=max(MIN_PREFETCH, top_k * PREFETCH_FACTOR))
        return [_chunk(hit) for hit in await self.store.query(tenant_id, q)]

    async def live_versions(
        self, tenant_id: uuid.UUID, kb_ids: Sequence[uuid.UUID] | None
    ) -> dict[uuid.UUID, int]:
        """document id -> live version, for the given (or all) knowledge bases."""
        query = select(Document.id, Document.live_version).where(
            col(Document.live_version).is_not(None))
        async with self.db.tenant(tenant_id) as session:
            if kb_ids:
                found = set((await session.exec(select(KnowledgeBase.id).where(
                    col(KnowledgeBase.id).in_(kb_ids)))).all())
                missing = [str(k) for k in kb_ids if k not in found]
                if missing:
                    raise NotFoundError(f"knowledge base(s) not found: {', '.join(missing)}")
                query = query.where(col(Document.kb_id).in_(kb_ids))
            rows = (await session.exec(query)).all()
        return {doc_id: int(v) for doc_id, v in rows if v is not None}

    def _encode(
        self, query: str, mode: SearchMode
    ) -> tuple[list[float] | None, SparseVector | None]:
        dense = self.models.dense.embed([query])[0] if mode != "sparse" else None
        sparse = self.models.sparse.encode_query(query) if mode != "dense" else None
        return dense, sparse


def _chunk(hit: ScoredChunk) -> RetrievedChunk:
    p = hit.payload
    return RetrievedChunk(
        chunk_id=hit.id, document_id=uuid.UUID(p["document_id"]), kb_id=uuid.UUID(p["kb_id"]),
        filename=p["filename"], version=p["version"], chunk_index=p["chunk_index"],
        page=p.get("page"), char_start=p["start"], char_end=p["end"],
        heading_path=list(p.get("heading_path") or []), text=p["text"], score=hit.score,
    )
