"""Server vector store: a Qdrant server (or qdrant-client's local mode), one collection
per tenant, spoken to through AsyncQdrantClient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import httpx
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from retrieval.vectorstore.base import (
    DENSE_VECTOR,
    DOCUMENT_ID_KEY,
    KB_ID_KEY,
    RRF_K,
    SPARSE_VECTOR,
    VERSION_KEY,
    AnyGroup,
    Below,
    ChunkPoint,
    Clause,
    Equals,
    HybridQuery,
    NoneOf,
    OneOf,
    PointFilter,
    ScoredChunk,
    SparseVector,
    VectorStoreConfig,
    VectorStoreError,
    batched,
    check_delete_filter,
    check_points,
    check_query,
    filter_clauses,
    store_name,
)

IN_MEMORY = ":memory:"
_PAYLOAD_INDEXES = {
    KB_ID_KEY: models.PayloadSchemaType.KEYWORD,
    DOCUMENT_ID_KEY: models.PayloadSchemaType.KEYWORD,
    VERSION_KEY: models.PayloadSchemaType.INTEGER,
}
# Statuses that mean "the store cannot serve you now" rather than "your request is wrong".
_UNAVAILABLE_STATUSES = {401, 403, 429, 500, 502, 503, 504}


class QdrantServerVectorStore:
    """VectorStore over a Qdrant server, one collection per tenant.

    ``config.url == ":memory:"`` runs qdrant-client's in-process local mode, which
    accepts the same requests (payload indexes are no-ops there).
    """

    def __init__(self, config: VectorStoreConfig) -> None:
        if not config.url:
            raise ValueError("the server vector store needs a url (or ':memory:')")
        self._config = config
        self._client = _make_client(config)
        # Collections this process created or saw; upsert skips the existence check for
        # them, and does not silently recreate one that another process dropped.
        self._known: set[str] = set()

    async def ensure_tenant(self, tenant_id: UUID) -> None:
        """Create the tenant's collection and payload indexes if missing."""
        name = self._name(tenant_id)
        with _store_errors(f"create collection {name}"):
            if not await self._client.collection_exists(name):
                await self._create_collection(name)
            for key, schema in _PAYLOAD_INDEXES.items():
                await self._client.create_payload_index(name, key, schema, wait=True)
        self._known.add(name)

    async def drop_tenant(self, tenant_id: UUID) -> None:
        """Delete the tenant's collection; idempotent."""
        name = self._name(tenant_id)
        self._known.discard(name)
        with _store_errors(f"delete collection {name}"), _missing_is_ok():
            await self._client.delete_collection(name)

    async def upsert(self, tenant_id: UUID, points: Sequence[ChunkPoint]) -> None:
        """Insert or replace points by id, creating the collection if missing."""
        check_points(points, self._config.dense_dim)
        name = self._name(tenant_id)
        if name not in self._known:
            await self.ensure_tenant(tenant_id)
        for batch in batched(points):
            with _store_errors(f"upsert into {name}"):
                structs = [_to_point_struct(p) for p in batch]
                await self._client.upsert(name, points=structs, wait=True)

    async def delete(self, tenant_id: UUID, flt: PointFilter) -> None:
        """Delete matching points; a no-op if the collection does not exist."""
        check_delete_filter(flt)
        if flt.matches_nothing:
            return
        name = self._name(tenant_id)
        selector = models.FilterSelector(filter=_to_filter(flt))
        with _store_errors(f"delete from {name}"), _missing_is_ok():
            await self._client.delete(name, points_selector=selector, wait=True)

    async def query(self, tenant_id: UUID, q: HybridQuery) -> list[ScoredChunk]:
        """Search the tenant's collection; [] if it does not exist."""
        check_query(q, self._config.dense_dim)
        if q.filter is not None and q.filter.matches_nothing:
            return []
        name = self._name(tenant_id)
        points: list[models.ScoredPoint] = []
        prefetch, query, using, threshold = _query_parts(q)
        # Qdrant applies the top-level filter to every prefetch as well.
        query_filter = None if q.filter is None else _to_filter(q.filter)
        with _store_errors(f"query {name}"), _missing_is_ok():
            response = await self._client.query_points(
                name,
                prefetch=prefetch,
                query=query,
                using=using,
                query_filter=query_filter,
                limit=q.limit,
                score_threshold=threshold,
                with_payload=True,
            )
            points = response.points
        return [ScoredChunk(UUID(str(p.id)), p.score, p.payload or {}) for p in points]

    async def count(self, tenant_id: UUID, flt: PointFilter | None = None) -> int:
        """Exact number of matching points; 0 if the collection does not exist."""
        if flt is not None and flt.matches_nothing:
            return 0
        name = self._name(tenant_id)
        count_filter = None if flt is None else _to_filter(flt)
        with _store_errors(f"count {name}"), _missing_is_ok():
            result = await self._client.count(name, count_filter=count_filter, exact=True)
            return result.count
        return 0

    async def ping(self) -> None:
        """Raise VectorStoreError unless the server answers a collection listing."""
        with _store_errors("list collections"):
            await self._client.get_collections()

    async def close(self) -> None:
        """Close the client's connections."""
        await self._client.close()

    def _name(self, tenant_id: UUID) -> str:
        return store_name(self._config.name_prefix, tenant_id)

    async def _create_collection(self, name: str) -> None:
        dense = models.VectorParams(size=self._config.dense_dim, distance=models.Distance.COSINE)
        sparse = models.SparseVectorParams(modifier=models.Modifier.IDF)
        try:
            await self._client.create_collection(
                name,
                vectors_config={DENSE_VECTOR: dense},
                sparse_vectors_config={SPARSE_VECTOR: sparse},
            )
        except (UnexpectedResponse, ValueError) as exc:
            # Another worker created it between our existence check and now.
            if not _is_already_exists(exc):
                raise


def _make_client(config: VectorStoreConfig) -> AsyncQdrantClient:
    if config.url == IN_MEMORY:
        return AsyncQdrantClient(location=IN_MEMORY)
    return AsyncQdrantClient(
        url=config.url,
        api_key=config.api_key,
        timeout=math.ceil(config.timeout_s),  # the client takes whole seconds
        pool_size=config.pool_size,
    )


@contextmanager
def _store_errors(action: str) -> Iterator[None]:
    """Turn "server unreachable or refusing" errors into VectorStoreError."""
    try:
        yield
    except (ResponseHandlingException, httpx.TransportError, OSError) as exc:
        raise VectorStoreError(
            f"Qdrant server unreachable while trying to {action}: {exc!r}; "
            "check QDRANT_URL and that the server is running"
        ) from exc
    except UnexpectedResponse as exc:
        if exc.status_code not in _UNAVAILABLE_STATUSES:
            raise
        hint = "check QDRANT_API_KEY" if exc.status_code in (401, 403) else "retry later"
        raise VectorStoreError(
            f"Qdrant server refused to {action} (HTTP {exc.status_code}); {hint}"
        ) from exc


@contextmanager
def _missing_is_ok() -> Iterator[None]:
    """Swallow "collection not found": a tenant without a store has no points."""
    try:
        yield
    except (UnexpectedResponse, ValueError) as exc:
        if not _is_not_found(exc):
            raise


def _is_not_found(exc: Exception) -> bool:
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code == 404
    # Local mode raises ValueError(f"Collection {name} not found").
    return str(exc).startswith("Collection ") and str(exc).endswith(" not found")


def _is_already_exists(exc: Exception) -> bool:
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code == 409
    return "already exists" in str(exc)


# --- translation into qdrant-client models --------------------------------------------


def _to_point_struct(point: ChunkPoint) -> models.PointStruct:
    vectors: dict[str, Any] = {
        DENSE_VECTOR: point.dense,
        SPARSE_VECTOR: _to_sparse(point.sparse),
    }
    return models.PointStruct(id=str(point.id), vector=vectors, payload=dict(point.payload))


def _to_sparse(vector: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(vector.indices), values=list(vector.values))


_QueryParts = tuple[
    list[models.Prefetch] | None,
    models.RrfQuery | list[float] | models.SparseVector,
    str | None,
    float | None,
]


def _query_parts(q: HybridQuery) -> _QueryParts:
    """The (prefetch, query, using, score_threshold) arguments of query_points."""
    if q.dense is not None and q.sparse is not None:
        prefetch = [
            models.Prefetch(query=q.dense, using=DENSE_VECTOR, limit=q.prefetch_limit,
                            score_threshold=q.dense_threshold),
            models.Prefetch(
                query=_to_sparse(q.sparse), using=SPARSE_VECTOR, limit=q.prefetch_limit,
                score_threshold=q.sparse_threshold,
            ),
        ]
        return prefetch, models.RrfQuery(rrf=models.Rrf(k=RRF_K)), None, None
    if q.dense is not None:
        return None, q.dense, DENSE_VECTOR, q.dense_threshold
    assert q.sparse is not None  # check_query guarantees one of them
    return None, _to_sparse(q.sparse), SPARSE_VECTOR, q.sparse_threshold


def _to_filter(flt: PointFilter) -> models.Filter:
    # An empty `must` matches every point.
    return models.Filter(must=[_to_condition(c) for c in filter_clauses(flt)])


def _to_condition(clause: Clause) -> models.Condition:
    if isinstance(clause, Equals):
        return models.FieldCondition(key=clause.key, match=models.MatchValue(value=clause.value))
    if isinstance(clause, OneOf):
        return models.FieldCondition(key=clause.key, match=models.MatchAny(any=list(clause.values)))
    if isinstance(clause, NoneOf):
        return models.FieldCondition(key=clause.key,
                                     match=models.MatchExcept(**{"except": list(clause.values)}))
    if isinstance(clause, Below):
        return models.FieldCondition(key=clause.key, range=models.Range(lt=clause.value))
    if isinstance(clause, AnyGroup):
        groups: list[models.Condition] = [
            models.Filter(must=[_to_condition(c) for c in group]) for group in clause.groups
        ]
        return models.Filter(should=groups)
    raise TypeError(f"unknown filter clause {clause!r}")
