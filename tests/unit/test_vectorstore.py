"""Behaviour of the vector-store adapters: one suite run against both, plus congruence.

The server adapter runs on qdrant-client's in-process ``:memory:`` mode, which speaks
the same request models as a Qdrant server; the embedded adapter on qdrant-edge shards
in a temporary folder.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from retrieval.vectorstore import (
    ChunkPoint,
    HybridQuery,
    PointFilter,
    ScoredChunk,
    SparseVector,
    VectorStore,
    VectorStoreConfig,
    VectorStoreError,
    open_vector_store,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning"),
]

DIM = 8
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["embedded", "server"]


def config_for(backend: str, root: Path) -> VectorStoreConfig:
    if backend == "embedded":
        return VectorStoreConfig(backend="embedded", path=root / "vectors", dense_dim=DIM)
    return VectorStoreConfig(backend="server", url=":memory:", dense_dim=DIM)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    vector_store = open_vector_store(config_for(request.param, tmp_path))
    yield vector_store
    await vector_store.close()


def direction(*weights: tuple[int, float]) -> list[float]:
    """A dense vector with the given (axis, weight) components."""
    vector = [0.0] * DIM
    for axis, weight in weights:
        vector[axis] = weight
    return vector


def chunk(
    *,
    kb: UUID,
    doc: UUID,
    version: int = 1,
    dense: list[float] | None = None,
    terms: dict[int, float] | None = None,
    meta: dict[str, str | int | bool] | None = None,
    point_id: UUID | None = None,
) -> ChunkPoint:
    terms = terms or {0: 1.0}
    payload = {"kb_id": str(kb), "document_id": str(doc), "version": version, "meta": meta or {}}
    return ChunkPoint(
        id=point_id or uuid4(),
        dense=dense or direction((0, 1.0)),
        sparse=SparseVector(list(terms), list(terms.values())),
        payload=payload,
    )


def ids(hits: list[ScoredChunk]) -> list[UUID]:
    return [hit.id for hit in hits]


async def all_ids(store: VectorStore, tenant: UUID, flt: PointFilter | None = None) -> set[UUID]:
    """Every point id the tenant has (optionally filtered), via a wide dense query."""
    query = HybridQuery(dense=direction((0, 1.0)), sparse=None, filter=flt, limit=1000)
    return set(ids(await store.query(tenant, query)))


# --- the shared suite -------------------------------------------------------------------


async def test_upserted_points_are_counted(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    await store.upsert(tenant, [chunk(kb=kb, doc=doc) for _ in range(3)])
    assert await store.count(tenant) == 3


async def test_upserting_same_ids_again_replaces_instead_of_duplicating(
    store: VectorStore,
) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    first = [chunk(kb=kb, doc=doc, version=1) for _ in range(3)]
    await store.upsert(tenant, first)
    second = [chunk(kb=kb, doc=doc, version=2, point_id=p.id) for p in first]
    await store.upsert(tenant, second)
    assert await store.count(tenant) == 3
    assert await store.count(tenant, PointFilter(version=2)) == 3


async def test_filter_by_kb_counts_and_returns_only_that_kb(store: VectorStore) -> None:
    tenant, kb_a, kb_b, doc = uuid4(), uuid4(), uuid4(), uuid4()
    in_a = [chunk(kb=kb_a, doc=doc) for _ in range(2)]
    await store.upsert(tenant, [*in_a, *(chunk(kb=kb_b, doc=doc) for _ in range(3))])
    assert await store.count(tenant, PointFilter(kb_ids=[kb_a])) == 2
    assert await store.count(tenant, PointFilter(kb_ids=[kb_a, kb_b])) == 5
    assert await all_ids(store, tenant, PointFilter(kb_ids=[kb_a])) == {p.id for p in in_a}


async def test_empty_allow_lists_match_nothing(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    await store.upsert(tenant, [chunk(kb=kb, doc=doc)])
    assert await store.count(tenant, PointFilter(kb_ids=[])) == 0
    assert await store.count(tenant, PointFilter(document_versions={})) == 0
    assert await all_ids(store, tenant, PointFilter(kb_ids=[])) == set()
    await store.delete(tenant, PointFilter(kb_ids=[]))
    assert await store.count(tenant) == 1


async def test_delete_by_document_removes_exactly_its_points(store: VectorStore) -> None:
    tenant, kb, doc_a, doc_b = uuid4(), uuid4(), uuid4(), uuid4()
    keep = [chunk(kb=kb, doc=doc_b) for _ in range(2)]
    await store.upsert(tenant, [*(chunk(kb=kb, doc=doc_a) for _ in range(3)), *keep])
    await store.delete(tenant, PointFilter(document_id=doc_a))
    assert await store.count(tenant) == 2
    assert await all_ids(store, tenant) == {p.id for p in keep}


async def test_delete_by_document_version_keeps_other_versions(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    new = chunk(kb=kb, doc=doc, version=2)
    await store.upsert(tenant, [chunk(kb=kb, doc=doc, version=1), new])
    await store.delete(tenant, PointFilter(document_id=doc, version=1))
    assert await all_ids(store, tenant) == {new.id}


async def test_live_version_filter_excludes_stale_versions(store: VectorStore) -> None:
    tenant, kb, doc_a, doc_b = uuid4(), uuid4(), uuid4(), uuid4()
    stale = [chunk(kb=kb, doc=doc_a, version=1) for _ in range(2)]
    live = [chunk(kb=kb, doc=doc_a, version=2), chunk(kb=kb, doc=doc_b, version=1)]
    await store.upsert(tenant, [*stale, *live])
    only_live = PointFilter(kb_ids=[kb], document_versions={doc_a: 2, doc_b: 1})
    assert await store.count(tenant, only_live) == 2
    assert await all_ids(store, tenant, only_live) == {p.id for p in live}


async def test_unsettled_filter_hides_only_the_versions_in_flight(store: VectorStore) -> None:
    tenant, kb = uuid4(), uuid4()
    settled, swapping, new_doc, deleted = uuid4(), uuid4(), uuid4(), uuid4()
    visible = [chunk(kb=kb, doc=settled, version=3), chunk(kb=kb, doc=swapping, version=2)]
    hidden = [chunk(kb=kb, doc=swapping, version=1), chunk(kb=kb, doc=swapping, version=3),
              chunk(kb=kb, doc=new_doc, version=1), chunk(kb=kb, doc=deleted, version=1)]
    await store.upsert(tenant, [*visible, *hidden])
    flt = PointFilter(unsettled={swapping: 2, new_doc: None, deleted: None})
    assert await all_ids(store, tenant, flt) == {p.id for p in visible}
    assert await store.count(tenant, flt) == 2


async def test_excluded_kbs_and_versions_below(store: VectorStore) -> None:
    tenant, kb, gone, doc = uuid4(), uuid4(), uuid4(), uuid4()
    old, current = chunk(kb=kb, doc=doc, version=1), chunk(kb=kb, doc=doc, version=4)
    await store.upsert(tenant, [old, current, chunk(kb=gone, doc=uuid4())])
    assert await all_ids(store, tenant, PointFilter(exclude_kb_ids=[gone])) == {
        old.id, current.id}
    await store.delete(tenant, PointFilter(document_id=doc, version_below=4))
    assert await all_ids(store, tenant, PointFilter(kb_ids=[kb])) == {current.id}


async def test_live_version_filter_with_thousands_of_documents(store: VectorStore) -> None:
    tenant, kb = uuid4(), uuid4()
    live = {uuid4(): 1 for _ in range(3000)}
    listed = list(live)[:5]
    await store.upsert(tenant, [chunk(kb=kb, doc=doc, version=1) for doc in listed])
    await store.upsert(tenant, [chunk(kb=kb, doc=doc, version=2) for doc in listed])
    assert await store.count(tenant, PointFilter(document_versions=live)) == 5


async def test_metadata_filter_matches_exact_values(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    en = chunk(kb=kb, doc=doc, meta={"lang": "en", "page": 3, "draft": True})
    de = chunk(kb=kb, doc=doc, meta={"lang": "de", "page": 4, "draft": False})
    await store.upsert(tenant, [en, de])
    assert await all_ids(store, tenant, PointFilter(metadata={"lang": "en"})) == {en.id}
    assert await all_ids(store, tenant, PointFilter(metadata={"page": 4})) == {de.id}
    assert await all_ids(store, tenant, PointFilter(metadata={"draft": True})) == {en.id}
    assert await store.count(tenant, PointFilter(metadata={"draft": False})) == 1
    assert await store.count(tenant, PointFilter(metadata={"lang": "en", "page": 4})) == 0


async def test_hybrid_ranks_point_matching_both_signals_first(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    dense_best = chunk(kb=kb, doc=doc, dense=direction((0, 1.0)), terms={3: 1.0})
    both = chunk(kb=kb, doc=doc, dense=direction((0, 1.0), (1, 0.3)), terms={7: 0.5})
    sparse_best = chunk(kb=kb, doc=doc, dense=direction((5, 1.0)), terms={7: 0.9})
    await store.upsert(tenant, [dense_best, both, sparse_best])
    sparse_query = SparseVector([7], [1.0])
    dense_query = direction((0, 1.0))

    hybrid = HybridQuery(dense=dense_query, sparse=sparse_query, prefetch_limit=2)
    hits = await store.query(tenant, hybrid)
    assert hits[0].id == both.id
    assert set(ids(hits[1:])) == {dense_best.id, sparse_best.id}

    dense_only = await store.query(tenant, HybridQuery(dense=dense_query, sparse=None))
    assert ids(dense_only)[:2] == [dense_best.id, both.id]
    sparse_only = await store.query(tenant, HybridQuery(dense=None, sparse=sparse_query))
    assert ids(sparse_only) == [sparse_best.id, both.id]


async def test_thresholds_drop_candidates_that_neither_side_finds_relevant(
    store: VectorStore,
) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    close = chunk(kb=kb, doc=doc, dense=direction((0, 1.0)), terms={3: 1.0})
    lexical = chunk(kb=kb, doc=doc, dense=direction((5, 1.0)), terms={7: 2.0})
    unrelated = chunk(kb=kb, doc=doc, dense=direction((6, 1.0)), terms={7: 0.1})
    await store.upsert(tenant, [close, lexical, unrelated])
    q = HybridQuery(dense=direction((0, 1.0)), sparse=SparseVector([7], [1.0]),
                    dense_threshold=0.5, sparse_threshold=0.5)  # IDF-weighted
    assert set(ids(await store.query(tenant, q))) == {close.id, lexical.id}
    dense_only = replace(q, sparse=None)
    assert ids(await store.query(tenant, dense_only)) == [close.id]
    sparse_only = replace(q, dense=None)
    assert ids(await store.query(tenant, sparse_only)) == [lexical.id]
    nothing = replace(q, dense=direction((1, 1.0)), sparse=SparseVector([9], [1.0]))
    assert await store.query(tenant, nothing) == []


async def test_query_honours_limit_and_returns_payload(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    points = [chunk(kb=kb, doc=doc, dense=direction((0, 1.0), (1, i / 10))) for i in range(5)]
    await store.upsert(tenant, points)
    hits = await store.query(tenant, HybridQuery(dense=direction((0, 1.0)), sparse=None, limit=2))
    assert ids(hits) == [points[0].id, points[1].id]
    assert hits[0].payload == points[0].payload
    assert hits[0].score >= hits[1].score


async def test_tenants_never_see_each_others_points(store: VectorStore) -> None:
    tenant_a, tenant_b, kb, doc = uuid4(), uuid4(), uuid4(), uuid4()
    a_points = [chunk(kb=kb, doc=doc) for _ in range(2)]
    await store.upsert(tenant_a, a_points)
    await store.upsert(tenant_b, [chunk(kb=kb, doc=doc) for _ in range(3)])
    hybrid = HybridQuery(dense=direction((0, 1.0)), sparse=SparseVector([0], [1.0]), limit=100)
    assert set(ids(await store.query(tenant_a, hybrid))) == {p.id for p in a_points}
    assert await store.count(tenant_a, PointFilter(kb_ids=[kb])) == 2
    await store.delete(tenant_b, PointFilter(kb_ids=[kb]))
    assert await store.count(tenant_a) == 2


async def test_drop_tenant_empties_it_and_is_idempotent(store: VectorStore) -> None:
    tenant, other, kb, doc = uuid4(), uuid4(), uuid4(), uuid4()
    await store.upsert(tenant, [chunk(kb=kb, doc=doc)])
    await store.upsert(other, [chunk(kb=kb, doc=doc)])
    await store.drop_tenant(tenant)
    await store.drop_tenant(tenant)
    assert await store.count(tenant) == 0
    assert await all_ids(store, tenant) == set()
    assert await store.count(other) == 1
    await store.upsert(tenant, [chunk(kb=kb, doc=doc)])
    assert await store.count(tenant) == 1


async def test_missing_tenant_reads_as_empty(store: VectorStore) -> None:
    tenant = uuid4()
    hybrid = HybridQuery(dense=direction((0, 1.0)), sparse=SparseVector([1], [1.0]))
    assert await store.count(tenant) == 0
    assert await store.count(tenant, PointFilter(kb_ids=[uuid4()])) == 0
    assert await store.query(tenant, hybrid) == []
    await store.delete(tenant, PointFilter(document_id=uuid4()))
    await store.drop_tenant(tenant)
    assert await store.count(tenant) == 0


async def test_ensure_tenant_is_idempotent_and_keeps_points(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    await store.ensure_tenant(tenant)
    assert await store.count(tenant) == 0
    await store.upsert(tenant, [chunk(kb=kb, doc=doc)])
    await store.ensure_tenant(tenant)
    assert await store.count(tenant) == 1


async def test_mistakes_are_refused_before_anything_is_written(store: VectorStore) -> None:
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    await store.upsert(tenant, [chunk(kb=kb, doc=doc)])
    with pytest.raises(ValueError, match="drop_tenant"):
        await store.delete(tenant, PointFilter())
    with pytest.raises(ValueError, match="dims"):
        await store.upsert(tenant, [chunk(kb=kb, doc=doc), chunk(kb=kb, doc=doc, dense=[1.0])])
    with pytest.raises(ValueError, match="dense vector, a sparse vector"):
        await store.query(tenant, HybridQuery(dense=None, sparse=None))
    assert await store.count(tenant) == 1


async def test_ping_succeeds_on_a_healthy_store(store: VectorStore) -> None:
    await store.ping()


# --- embedded-only behaviour ------------------------------------------------------------


async def test_embedded_data_survives_close_and_reopen(tmp_path: Path) -> None:
    config = config_for("embedded", tmp_path)
    tenant, kb, doc = uuid4(), uuid4(), uuid4()
    points = [chunk(kb=kb, doc=doc) for _ in range(3)]
    first = open_vector_store(config)
    await first.upsert(tenant, points)
    await first.close()

    reopened = open_vector_store(config)
    try:
        assert await reopened.count(tenant, PointFilter(kb_ids=[kb])) == 3
        assert await all_ids(reopened, tenant) == {p.id for p in points}
        await reopened.upsert(tenant, [chunk(kb=kb, doc=doc)])
        assert await reopened.count(tenant) == 4
    finally:
        await reopened.close()


async def test_embedded_root_opens_in_one_store_at_a_time(tmp_path: Path) -> None:
    config = config_for("embedded", tmp_path)
    first = open_vector_store(config)
    with pytest.raises(VectorStoreError, match="in use by another process"):
        open_vector_store(config)
    await first.close()
    second = open_vector_store(config)
    await second.close()


async def test_embedded_root_is_refused_to_another_process(tmp_path: Path) -> None:
    config = config_for("embedded", tmp_path)
    holder = open_vector_store(config)
    script = (
        "import sys; from pathlib import Path\n"
        "from retrieval.vectorstore import VectorStoreConfig, VectorStoreError, open_vector_store\n"
        "try: open_vector_store(VectorStoreConfig(backend='embedded', path=Path(sys.argv[1])))\n"
        "except VectorStoreError: sys.exit(3)\n"
    )
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(config.path), cwd=PROJECT_ROOT
        )
        returncode = await asyncio.wait_for(child.wait(), timeout=60)
    finally:
        await holder.close()
    assert returncode == 3


async def test_embedded_store_refuses_work_after_close(tmp_path: Path) -> None:
    store = open_vector_store(config_for("embedded", tmp_path))
    await store.close()
    with pytest.raises(VectorStoreError, match="closed"):
        await store.ping()
    with pytest.raises(VectorStoreError, match="closed"):
        await store.count(uuid4())
    with pytest.raises(VectorStoreError, match="closed"):
        await store.drop_tenant(uuid4())


# --- server-only behaviour --------------------------------------------------------------


async def test_unreachable_server_raises_vector_store_error() -> None:
    config = VectorStoreConfig(backend="server", url="http://127.0.0.1:9", timeout_s=1.0)
    store = open_vector_store(config)
    try:
        with pytest.raises(VectorStoreError, match="unreachable"):
            await store.ping()
        with pytest.raises(VectorStoreError, match="unreachable"):
            await store.count(uuid4())
    finally:
        await store.close()


# --- congruence: the same calls on both adapters give the same answers -------------------


def random_corpus(rng: random.Random, tenant_docs: list[tuple[UUID, UUID]]) -> list[ChunkPoint]:
    """Points spread over (kb, doc) pairs and two versions, with random vectors."""
    points = []
    for i in range(90):
        kb, doc = tenant_docs[i % len(tenant_docs)]
        terms = {term: rng.uniform(0.1, 2.0) for term in rng.sample(range(30), rng.randint(1, 5))}
        dense = [rng.gauss(0.0, 1.0) for _ in range(DIM)]
        meta: dict[str, str | int | bool] = {"lang": rng.choice(["en", "de"]), "flag": i % 3 == 0}
        points.append(chunk(kb=kb, doc=doc, version=1 + i % 2, dense=dense, terms=terms, meta=meta))
    return points


def ranking(hits: list[ScoredChunk]) -> list[frozenset[UUID]]:
    """Ids grouped by equal score, best first: ties may come back in either order."""
    groups: list[tuple[float, set[UUID]]] = []
    for hit in hits:
        if groups and math.isclose(groups[-1][0], hit.score, rel_tol=1e-5):
            groups[-1][1].add(hit.id)
        else:
            groups.append((hit.score, {hit.id}))
    return [frozenset(group) for _, group in groups]


def congruence_queries(rng: random.Random, filters: list[PointFilter | None]) -> list[HybridQuery]:
    queries = []
    for flt in filters:
        dense = [rng.gauss(0.0, 1.0) for _ in range(DIM)]
        sparse_terms = rng.sample(range(30), 3)
        sparse = SparseVector(sparse_terms, [1.0] * len(sparse_terms))
        # limit >= both prefetches together, so no tie is cut off at the end.
        queries += [
            HybridQuery(dense=dense, sparse=None, filter=flt, limit=15),
            HybridQuery(dense=None, sparse=sparse, filter=flt, limit=15),
            HybridQuery(dense=dense, sparse=sparse, filter=flt, limit=20, prefetch_limit=10),
        ]
    return queries


async def test_embedded_and_server_adapters_agree(tmp_path: Path) -> None:
    rng = random.Random(20240611)  # noqa: S311 - reproducible test data, not secrets
    tenant, kbs, docs = uuid4(), [uuid4(), uuid4()], [uuid4() for _ in range(4)]
    pairs = [(kbs[i % 2], doc) for i, doc in enumerate(docs)]
    filters: list[PointFilter | None] = [
        None,
        PointFilter(kb_ids=[kbs[0]]),
        PointFilter(document_versions={docs[0]: 1, docs[1]: 2, docs[2]: 1}),
        PointFilter(kb_ids=kbs, metadata={"lang": "en", "flag": True}),
    ]
    corpus = random_corpus(rng, pairs)
    queries = congruence_queries(rng, filters)
    embedded, server = (open_vector_store(config_for(b, tmp_path)) for b in BACKENDS)
    try:
        for store in (embedded, server):
            await store.upsert(tenant, corpus)
        await assert_same_counts(embedded, server, tenant, filters)
        for query in queries:
            await assert_same_ranking(embedded, server, tenant, query)

        for store in (embedded, server):
            await store.delete(tenant, PointFilter(document_id=docs[3]))
        await assert_same_counts(embedded, server, tenant, filters)
        for query in queries:
            await assert_same_after_delete(embedded, server, tenant, query)
    finally:
        await embedded.close()
        await server.close()


async def assert_same_counts(
    embedded: VectorStore, server: VectorStore, tenant: UUID, filters: list[PointFilter | None]
) -> None:
    for flt in filters:
        assert await embedded.count(tenant, flt) == await server.count(tenant, flt), flt


async def assert_same_ranking(
    embedded: VectorStore, server: VectorStore, tenant: UUID, query: HybridQuery
) -> None:
    embedded_hits = await embedded.query(tenant, query)
    server_hits = await server.query(tenant, query)
    assert embedded_hits, "congruence queries should find something"
    assert ranking(embedded_hits) == ranking(server_hits), query
    if query.dense is not None:
        # Cosine and RRF scores are defined alike on both; BM25's IDF weights may differ.
        for mine, theirs in zip(embedded_hits, server_hits, strict=True):
            assert mine.score == pytest.approx(theirs.score, rel=1e-4)


async def assert_same_after_delete(
    embedded: VectorStore, server: VectorStore, tenant: UUID, query: HybridQuery
) -> None:
    """Dense rankings still agree; anything using BM25 agrees on which points match.

    qdrant-edge keeps counting deleted points in BM25's IDF until its segments are
    optimized, while local mode forgets them at once, so sparse scores drift apart.
    """
    if query.sparse is None:
        await assert_same_ranking(embedded, server, tenant, query)
        return
    wide = replace(query, limit=1000, prefetch_limit=1000)
    assert set(ids(await embedded.query(tenant, wide))) == set(
        ids(await server.query(tenant, wide))
    )
