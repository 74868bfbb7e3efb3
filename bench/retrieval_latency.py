"""Search latency at 10k and 100k chunks in one tenant, through the real search service.

    .venv/bin/python bench/retrieval_latency.py [--sizes 10000,100000] [--queries 200]

Uses DATABASE_URL/REDIS_URL when set, else starts the embedded stack in a temp folder;
either way a scratch database. One tenant, one knowledge base, documents of 20 chunks in
PostgreSQL, and 20 documents in the unsettled set (10 with a version in flight, 10
deleted), so every query pays the real live-version filter. Timed: ``SearchService.search``
end to end (PostgreSQL lookup of the unsettled set + query encoding + the hybrid query in
the embedded Qdrant store), and the store query alone.

Embedding 100k chunks on this CPU would take an hour, so the store holds real embeddings
of a few thousand generated chunks plus copies of them with small gaussian noise
(renormalised) and the same BM25 vectors: the index has the real size and shape.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import numpy as np
from ingest_throughput import backing_services, corpus, scratch_db

from app.db.engine import Database, make_engine
from app.db.migrate import migrate
from app.db.models import Document, DocumentStatus, KnowledgeBase, Tenant, Tier
from app.domain.knowledge import unsettled
from app.domain.knowledge.pipeline import point_id
from app.domain.search.service import SearchService
from app.embeddings import Models, load_models
from app.settings import ChatSettings, DatabaseSettings, IngestSettings
from ingestion import chunk_document, parse_document
from retrieval.vectorstore import (
    ChunkPoint,
    HybridQuery,
    PointFilter,
    SparseVector,
    VectorStore,
    VectorStoreConfig,
    open_vector_store,
)

CHUNKS_PER_DOC = 20
NOISE = 0.05
QUESTIONS = [
    "How often must the equipment be recalibrated?", "What does this error code mean?",
    "Who approves travel abroad?", "How do I reset my password?", "Where is the manual?",
    "What torque for the mounting bolts?", "Is breakfast free?", "rules for visitors",
    "warranty period of the pump", "network link drops", "handbook section on safety",
    "the display stays blank", "expense claims deadline", "parental leave weeks",
]


async def seed(db: Database, store: VectorStore, tenant_id: uuid.UUID, size: int,
               base_dense: np.ndarray, base: list[tuple[str, SparseVector]]) -> None:
    """Rows and points for one tenant of ``size`` chunks, 20 unsettled documents."""
    rng = np.random.default_rng(size)
    kb_id = uuid.uuid4()
    doc_ids = [uuid.uuid4() for _ in range(size // CHUNKS_PER_DOC)]
    async with db.platform() as s:
        s.add(Tenant(id=tenant_id, slug=f"lat-{size}", name="latency", tier=Tier.enterprise))
    async with db.tenant(tenant_id) as s:
        s.add(KnowledgeBase(id=kb_id, tenant_id=tenant_id, name="kb"))
        await s.flush()
        s.add_all([Document(id=d, tenant_id=tenant_id, kb_id=kb_id, filename=f"{d}.md",
                            format="markdown", size_bytes=1, sha256=d.hex,
                            status=DocumentStatus.ready, version=1, live_version=1,
                            chunk_count=CHUNKS_PER_DOC) for d in doc_ids])
    async with db.tenant(tenant_id) as s:
        for d in doc_ids[:10]:  # a version 2 in flight: only version 1 may be seen
            await unsettled.mark(s, tenant_id, d, unsettled.DOCUMENT, kb_id)
        for _ in range(10):  # deleted documents whose points are not purged yet
            await unsettled.mark(s, tenant_id, uuid.uuid4(), unsettled.DOCUMENT, kb_id)
    for start in range(0, size, 1024):
        points = []
        for i in range(start, min(start + 1024, size)):
            j = i % len(base)
            vec = base_dense[j] + rng.normal(0, NOISE, base_dense.shape[1])
            vec /= np.linalg.norm(vec)
            doc = doc_ids[i // CHUNKS_PER_DOC]
            text, sparse = base[j]
            points.append(ChunkPoint(
                id=point_id(doc, 1, i % CHUNKS_PER_DOC), dense=vec.tolist(),
                sparse=sparse,
                payload={"kb_id": str(kb_id), "document_id": str(doc), "version": 1,
                         "chunk_index": i % CHUNKS_PER_DOC, "text": text, "start": 0,
                         "end": len(text), "page": None, "heading_path": [],
                         "filename": f"{doc}.md", "meta": {}}))
        await store.upsert(tenant_id, points)


async def timed(call: Callable[[str], Awaitable[object]], texts: list[str]) -> list[float]:
    """Milliseconds of one call per text, one after another."""
    out = []
    for text in texts:
        started = time.perf_counter()
        await call(text)
        out.append((time.perf_counter() - started) * 1000)
    return out


async def _store_query(store: VectorStore, tenant: uuid.UUID, q: HybridQuery,
                       _text: str) -> object:
    return await store.query(tenant, q)


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"p50 {q[49]:.1f} ms, p95 {q[94]:.1f} ms, mean {statistics.fmean(ms):.1f} ms"


async def run(db_url: str, folder: Path, sizes: list[int], queries: int,
              models: Models) -> None:
    owner = DatabaseSettings(url=await scratch_db(DatabaseSettings(url=db_url).owner_url()))
    await migrate(owner)
    db = Database(make_engine(owner.application_url(), owner))
    store = open_vector_store(VectorStoreConfig(backend="embedded", path=folder / "q",
                                                dense_dim=384))
    texts = [c.text for d in corpus(100, 30)
             for c in chunk_document(parse_document(d, "markdown"), models.counter)]
    started = time.perf_counter()
    base_dense = np.asarray(models.dense.embed(texts), dtype=np.float32)
    base = list(zip(texts, models.sparse.encode_documents(texts), strict=True))
    print(f"base: {len(texts)} real chunks embedded in {time.perf_counter() - started:.0f} s")
    search = SearchService(db, store, models, ChatSettings())
    rng = random.Random(1)  # noqa: S311  (reproducible queries)
    asked = [rng.choice(QUESTIONS) + rng.choice(["", " please", " now", " today"])
             for _ in range(queries)]
    try:
        for size in sizes:
            tenant = uuid.uuid4()
            started = time.perf_counter()
            await seed(db, store, tenant, size, base_dense, base)
            print(f"\n{size} chunks in one tenant (seeded in {time.perf_counter() - started:.0f}"
                  f" s; {size // CHUNKS_PER_DOC} documents, 20 unsettled)")
            for mode in ("hybrid", "dense", "sparse"):
                call = partial(search.search, tenant, mode=mode)
                await timed(call, asked[:10])  # warm-up
                ms = await timed(call, asked)
                print(f"| {size} | search service, {mode} | {summary(ms)} |")
            hidden = await search.unsettled(tenant, None)
            flt = PointFilter(unsettled=hidden.documents)
            dense, sparse = models.dense.embed([asked[0]])[0], models.sparse.encode_query(asked[0])
            q = HybridQuery(dense=dense, sparse=sparse, filter=flt, limit=5, prefetch_limit=50)
            ms = await timed(partial(_store_query, store, tenant, q), asked)
            print(f"| {size} | store query alone, hybrid | {summary(ms)} |")
    finally:
        await store.close()
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with backing_services("tenantrag-latency-", need_redis=False) as (folder, db_url, _):
        models = load_models(IngestSettings())
        asyncio.run(run(db_url, folder, sizes, args.queries, models))


if __name__ == "__main__":
    main()
