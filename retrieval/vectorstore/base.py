"""The vector-store interface, its data types, and the rules both adapters share.

Adapters translate these types into their backend's models; anything that decides
*what* is stored or matched (names, payload keys, filter semantics, validation) lives
here so that the embedded and server stores cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from uuid import UUID

DENSE_VECTOR = "dense"
SPARSE_VECTOR = "bm25"
KB_ID_KEY = "kb_id"
DOCUMENT_ID_KEY = "document_id"
VERSION_KEY = "version"
METADATA_PREFIX = "meta"
# RRF constant, the same in both adapters. Qdrant's default is 2 (top-heavy); 10 won on
# bench/retrieval_quality.py over 2 and 60 (BENCHMARKS.md).
RRF_K = 10
# Bounds one write request (server body size) and one GIL-holding embedded call.
UPSERT_BATCH_SIZE = 256

MetadataValue = str | int | bool
_T = TypeVar("_T")


class VectorStoreError(Exception):
    """The vector store is unavailable or failed; the message says what to check."""


@dataclass(frozen=True)
class SparseVector:
    """A sparse (BM25) vector: parallel lists of term indices and weights."""

    indices: list[int]
    values: list[float]


@dataclass(frozen=True)
class ChunkPoint:
    """One chunk to store: its id, both vectors and its payload."""

    id: UUID
    dense: list[float]
    sparse: SparseVector
    payload: dict[str, Any]


@dataclass(frozen=True)
class PointFilter:
    """Conditions on a tenant's points; all given conditions must hold.

    ``document_versions`` keeps only points whose (document_id, version) pair is
    listed, i.e. the live version of each document. An empty ``kb_ids`` or
    ``document_versions`` matches nothing.

    ``unsettled`` is the scalable form of the same rule: it names only the documents
    whose stored points may include a version readers must not see (being ingested,
    replaced, or deleted), each with the one version that may be seen (None: none).
    Points of every other document pass, so the filter's size follows the documents
    in flight, not the size of the knowledge base.
    """

    kb_ids: Sequence[UUID] | None = None
    exclude_kb_ids: Sequence[UUID] | None = None
    document_id: UUID | None = None
    version: int | None = None
    version_below: int | None = None
    document_versions: Mapping[UUID, int] | None = None
    unsettled: Mapping[UUID, int | None] | None = None
    metadata: Mapping[str, MetadataValue] | None = None

    @property
    def matches_nothing(self) -> bool:
        """True when an empty allow-list makes the filter unsatisfiable."""
        return (self.kb_ids is not None and len(self.kb_ids) == 0) or (
            self.document_versions is not None and len(self.document_versions) == 0
        )

    @property
    def is_unconstrained(self) -> bool:
        """True when no condition is set, so the filter matches every point."""
        return not self.matches_nothing and not filter_clauses(self)


@dataclass(frozen=True)
class HybridQuery:
    """A search: dense and sparse fused with RRF, or whichever one is given.

    A threshold drops that side's candidates scoring below it before fusion (cosine
    similarity for dense, BM25 score for sparse), so a passage is only returned if
    at least one side found it relevant enough.
    """

    dense: list[float] | None
    sparse: SparseVector | None
    filter: PointFilter | None = None
    limit: int = 10
    prefetch_limit: int = 50
    dense_threshold: float | None = None
    sparse_threshold: float | None = None


@dataclass(frozen=True)
class ScoredChunk:
    """One search hit: the chunk id, its score (higher is better) and payload."""

    id: UUID
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class VectorStoreConfig:
    """Where the vector store lives and how tenant stores are shaped."""

    backend: Literal["embedded", "server"]
    path: Path | None = None
    url: str | None = None
    api_key: str | None = None
    dense_dim: int = 384
    name_prefix: str = "tenant_"
    timeout_s: float = 10.0
    pool_size: int = 16


class VectorStore(Protocol):
    """Per-tenant chunk storage with filtered hybrid search.

    Every tenant has its own collection (server) or shard folder (embedded), so a
    query for one tenant cannot see another tenant's points.
    """

    async def ensure_tenant(self, tenant_id: UUID) -> None:
        """Create the tenant's store with vectors and payload indexes; idempotent."""
        ...

    async def drop_tenant(self, tenant_id: UUID) -> None:
        """Delete the tenant's store and all its points; idempotent."""
        ...

    async def upsert(self, tenant_id: UUID, points: Sequence[ChunkPoint]) -> None:
        """Insert or replace points by id, creating the tenant's store if missing."""
        ...

    async def delete(self, tenant_id: UUID, flt: PointFilter) -> None:
        """Delete the points matching ``flt``; a no-op if the store is missing."""
        ...

    async def query(self, tenant_id: UUID, q: HybridQuery) -> list[ScoredChunk]:
        """Search the tenant's points, best first; [] if the store is missing."""
        ...

    async def count(self, tenant_id: UUID, flt: PointFilter | None = None) -> int:
        """Exact number of points matching ``flt``; 0 if the store is missing."""
        ...

    async def ping(self) -> None:
        """Raise VectorStoreError if the store cannot serve requests."""
        ...

    async def close(self) -> None:
        """Release connections, files and locks."""
        ...


def store_name(name_prefix: str, tenant_id: UUID) -> str:
    """Name of a tenant's collection or shard folder; derived from the UUID only."""
    return f"{name_prefix}{tenant_id.hex}"


# --- filter semantics, shared by both adapters -------------------------------------


@dataclass(frozen=True)
class Equals:
    """Payload value at ``key`` equals ``value``."""

    key: str
    value: MetadataValue


@dataclass(frozen=True)
class OneOf:
    """Payload value at ``key`` is one of ``values``."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class NoneOf:
    """Payload value at ``key`` is none of ``values``."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Below:
    """Payload value at ``key`` is a number strictly below ``value``."""

    key: str
    value: int


@dataclass(frozen=True)
class AnyGroup:
    """At least one group holds, where a group holds if all its clauses hold."""

    groups: tuple[tuple[Clause, ...], ...]


Clause = Equals | OneOf | NoneOf | Below | AnyGroup


def filter_clauses(flt: PointFilter) -> list[Clause]:
    """The conditions (all must hold) that a PointFilter stands for."""
    clauses: list[Clause] = []
    if flt.kb_ids is not None:
        clauses.append(OneOf(KB_ID_KEY, tuple(str(kb_id) for kb_id in flt.kb_ids)))
    if flt.document_id is not None:
        clauses.append(Equals(DOCUMENT_ID_KEY, str(flt.document_id)))
    if flt.exclude_kb_ids:
        clauses.append(NoneOf(KB_ID_KEY, tuple(str(kb_id) for kb_id in flt.exclude_kb_ids)))
    if flt.version is not None:
        clauses.append(Equals(VERSION_KEY, flt.version))
    if flt.version_below is not None:
        clauses.append(Below(VERSION_KEY, flt.version_below))
    if flt.document_versions:
        clauses.append(_live_versions(flt.document_versions))
    if flt.unsettled:
        clauses.append(_settled_or_pinned(flt.unsettled))
    for key, value in (flt.metadata or {}).items():
        clauses.append(Equals(f"{METADATA_PREFIX}.{key}", value))
    return clauses


def _live_versions(document_versions: Mapping[UUID, int]) -> AnyGroup:
    groups = tuple(
        (Equals(DOCUMENT_ID_KEY, str(doc_id)), Equals(VERSION_KEY, version))
        for doc_id, version in document_versions.items()
    )
    return AnyGroup(groups)


def _settled_or_pinned(unsettled: Mapping[UUID, int | None]) -> AnyGroup:
    others: tuple[Clause, ...] = (NoneOf(DOCUMENT_ID_KEY, tuple(str(d) for d in unsettled)),)
    pinned = tuple(
        (Equals(DOCUMENT_ID_KEY, str(doc_id)), Equals(VERSION_KEY, version))
        for doc_id, version in unsettled.items() if version is not None
    )
    return AnyGroup((others, *pinned))


# --- validation, shared so both adapters reject the same mistakes -------------------


def check_points(points: Sequence[ChunkPoint], dense_dim: int) -> None:
    """Raise ValueError for points the store would reject, before any is written."""
    for point in points:
        _check_dense(point.dense, dense_dim, f"point {point.id}")
        _check_sparse(point.sparse, f"point {point.id}")


def check_query(q: HybridQuery, dense_dim: int) -> None:
    """Raise ValueError for a query that cannot run."""
    if q.dense is None and q.sparse is None:
        raise ValueError("a query needs a dense vector, a sparse vector, or both")
    if q.limit < 1 or q.prefetch_limit < 1:
        raise ValueError("query limit and prefetch_limit must be at least 1")
    if q.dense is not None:
        _check_dense(q.dense, dense_dim, "query")
    if q.sparse is not None:
        _check_sparse(q.sparse, "query")


def check_delete_filter(flt: PointFilter) -> None:
    """Refuse a delete that would wipe the whole tenant by accident."""
    if flt.is_unconstrained:
        raise ValueError("delete needs at least one condition; use drop_tenant to remove all")


def _check_dense(vector: Sequence[float], dense_dim: int, what: str) -> None:
    if len(vector) != dense_dim:
        raise ValueError(f"{what}: dense vector has {len(vector)} dims, store expects {dense_dim}")


def _check_sparse(vector: SparseVector, what: str) -> None:
    if len(vector.indices) != len(vector.values):
        raise ValueError(f"{what}: sparse vector indices and values differ in length")


def batched(items: Sequence[_T], size: int = UPSERT_BATCH_SIZE) -> Iterator[Sequence[_T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
