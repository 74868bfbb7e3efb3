"""Hybrid retrieval over the authenticated tenant's own store, live versions only.

Which versions readers may see comes from PostgreSQL at query time: the (small) set of
documents with a version in flight and of knowledge bases being deleted (see
``knowledge/unsettled.py``). So a version swap is atomic for readers (the old version
until the new one is published) and a deleted document is never matched, even before
its vectors are removed, while the filter stays small however large the tenant grows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from sqlmodel import col, select

from app.db.engine import Database
from app.db.models import KnowledgeBase
from app.domain.knowledge import unsettled
from app.domain.search.schemas import FilterValue, RetrievedChunk, SearchMode
from app.embeddings import Models
from app.errors import NotFoundError
from app.settings import ChatSettings
from retrieval.rerank import Reranker, rerank
from retrieval.vectorstore import (
    HybridQuery,
    PointFilter,
    ScoredChunk,
    SparseVector,
    VectorStore,
)

PREFETCH_FACTOR = 5
RERANK_FACTOR, RERANK_MAX = 4, 50
MIN_PREFETCH = 50


class SearchService:
    """Finds the passages of a tenant's documents that best match a query."""

    def __init__(self, db: Database, store: VectorStore, models: Models,
                 relevance: ChatSettings | None = None, reranker: Reranker | None = None) -> None:
        self.db = db
        self.store = store
        self.models = models
        self.reranker = reranker
        # Thresholds below which neither side counts a passage as relevant.
        self.dense_threshold = relevance.min_dense_score if relevance else None
        self.sparse_threshold = relevance.min_sparse_score or None if relevance else None

    async def search(
        self, tenant_id: uuid.UUID, query: str, kb_ids: Sequence[uuid.UUID] | None = None,
        top_k: int = 5, filters: dict[str, FilterValue] | None = None,
        mode: SearchMode = "hybrid", relevant_only: bool = True,
    ) -> list[RetrievedChunk]:
        """Top passages, best first; with ``relevant_only``, only passages that the
        dense or the sparse side scores above its relevance threshold."""
        hidden = await self.unsettled(tenant_id, kb_ids)
        dense, sparse = await asyncio.to_thread(self._encode, query, mode)
        flt = PointFilter(kb_ids=list(kb_ids) if kb_ids else None,
                          exclude_kb_ids=hidden.kbs or None,
                          unsettled=hidden.documents or None, metadata=filters or None)
        # With a reranker, fetch a wider candidate set and let it choose the best.
        limit = min(RERANK_MAX, max(top_k * RERANK_FACTOR, top_k)) if self.reranker else top_k
        q = HybridQuery(dense=dense, sparse=sparse, filter=flt, limit=limit,
                        prefetch_limit=max(MIN_PREFETCH, top_k * PREFETCH_FACTOR),
                        dense_threshold=self.dense_threshold if relevant_only else None,
                        sparse_threshold=self.sparse_threshold if relevant_only else None)
        hits = [_chunk(hit) for hit in await self.store.query(tenant_id, q)]
        if self.reranker is None or not hits:
            return hits
        scores = await asyncio.to_thread(self.reranker.scores, query, [h.text for h in hits])
        return [h.model_copy(update={"score": score})
                for h, score in rerank(hits, scores, top_k)]

    async def unsettled(
        self, tenant_id: uuid.UUID, kb_ids: Sequence[uuid.UUID] | None
    ) -> unsettled.Unsettled:
        """What search must hide; NotFoundError if a knowledge base asked for is missing."""
        async with self.db.tenant(tenant_id) as session:
            if kb_ids:
                found = set((await session.exec(select(KnowledgeBase.id).where(
                    col(KnowledgeBase.id).in_(kb_ids)))).all())
                missing = [str(k) for k in kb_ids if k not in found]
                if missing:
                    raise NotFoundError(f"knowledge base(s) not found: {', '.join(missing)}")
            return await unsettled.load(session, kb_ids)

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
        # Points stored before the check existed have no flag: not suspected.
        suspected_instructions=bool(p.get("suspected_instructions")),
        instruction_reasons=list(p.get("instruction_reasons") or []),
    )
