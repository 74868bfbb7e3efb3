"""Embedded vector store: one qdrant-edge shard folder per tenant under a root folder.

qdrant-edge calls hold the GIL, so each runs in a worker thread (to keep the event
loop's other coroutines scheduled between calls) under a per-shard lock (a shard is
not safe for concurrent use). A shard folder may be opened by one process only, so the
store takes an exclusive lock on the root folder for its lifetime.

Deleted points stay in a shard's segments, and count in BM25's IDF statistics, until
the shard is optimized. A Qdrant server optimizes in the background; the serving
process never calls optimize() (it blocks for minutes on large shards), so after
deletes sparse scores differ slightly from the server's.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar, cast
from uuid import UUID

import numpy as np
import qdrant_edge as qe

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
    MetadataValue,
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

_T = TypeVar("_T")
LOCK_FILE_NAME = ".vectorstore.lock"
_PAYLOAD_INDEXES = {
    KB_ID_KEY: qe.PayloadSchemaType.Keyword,
    DOCUMENT_ID_KEY: qe.PayloadSchemaType.Keyword,
    VERSION_KEY: qe.PayloadSchemaType.Integer,
}


@dataclass
class _ShardSlot:
    """A tenant's shard, opened on first use; ``lock`` serialises all calls on it."""

    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)
    shard: qe.EdgeShard | None = None


class EmbeddedVectorStore:
    """VectorStore over qdrant-edge shards in ``config.path``, one folder per tenant."""

    def __init__(self, config: VectorStoreConfig) -> None:
        if config.path is None:
            raise ValueError("the embedded vector store needs a root folder (path)")
        self._root = config.path
        self._config = config
        self._lock_file = _lock_root(self._root)
        self._slots: dict[str, _ShardSlot] = {}
        self._slots_guard = threading.Lock()
        self._closed = False

    async def ensure_tenant(self, tenant_id: UUID) -> None:
        """Create the tenant's shard (vectors and payload indexes) if missing."""
        await self._call(tenant_id, "create the shard", lambda shard: None, None, create=True)

    async def drop_tenant(self, tenant_id: UUID) -> None:
        """Close the tenant's shard and remove its folder; idempotent."""
        await asyncio.to_thread(self._drop, self._slot(tenant_id))

    async def upsert(self, tenant_id: UUID, points: Sequence[ChunkPoint]) -> None:
        """Insert or replace points by id, creating the shard if missing."""
        check_points(points, self._config.dense_dim)
        for batch in batched(points):
            operation = qe.UpdateOperation.upsert_points([_to_edge_point(p) for p in batch])
            await self._call(tenant_id, "upsert points", _updater(operation), None, create=True)

    async def delete(self, tenant_id: UUID, flt: PointFilter) -> None:
        """Delete matching points; a no-op if the shard does not exist."""
        check_delete_filter(flt)
        if flt.matches_nothing:
            return
        operation = qe.UpdateOperation.delete_points_by_filter(_to_edge_filter(flt))
        await self._call(tenant_id, "delete points", _updater(operation), None)

    async def query(self, tenant_id: UUID, q: HybridQuery) -> list[ScoredChunk]:
        """Search the tenant's shard; [] if it does not exist."""
        check_query(q, self._config.dense_dim)
        if q.filter is not None and q.filter.matches_nothing:
            return []
        request = _to_edge_query(q)
        no_hits: list[qe.ScoredPoint] = []
        hits = await self._call(tenant_id, "query", lambda shard: shard.query(request), no_hits)
        return [ScoredChunk(_as_uuid(hit.id), hit.score, hit.payload or {}) for hit in hits]

    async def count(self, tenant_id: UUID, flt: PointFilter | None = None) -> int:
        """Exact number of matching points; 0 if the shard does not exist."""
        if flt is not None and flt.matches_nothing:
            return 0
        edge_filter = None if flt is None else _to_edge_filter(flt)
        request = qe.CountRequest(exact=True, filter=edge_filter)
        return await self._call(tenant_id, "count points", lambda shard: shard.count(request), 0)

    async def ping(self) -> None:
        """Raise VectorStoreError unless the store is open and its root is writable."""
        if self._closed:
            raise VectorStoreError("the embedded vector store is closed")
        if not await asyncio.to_thread(os.access, self._root, os.W_OK):
            raise VectorStoreError(f"vector store folder {self._root} is not writable")

    async def close(self) -> None:
        """Flush and close every open shard, then release the root folder lock."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_all)

    # --- shard access -----------------------------------------------------------------

    def _slot(self, tenant_id: UUID) -> _ShardSlot:
        name = store_name(self._config.name_prefix, tenant_id)
        with self._slots_guard:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = _ShardSlot(self._root / name)
            return slot

    async def _call(
        self,
        tenant_id: UUID,
        action: str,
        fn: Callable[[qe.EdgeShard], _T],
        if_missing: _T,
        *,
        create: bool = False,
    ) -> _T:
        """Run ``fn`` on the tenant's shard in a worker thread, holding the shard lock.

        Returns ``if_missing`` without calling ``fn`` when the shard does not exist,
        unless ``create`` asks to create it first.
        """
        slot = self._slot(tenant_id)
        return await asyncio.to_thread(self._call_locked, slot, action, fn, if_missing, create)

    def _call_locked(
        self,
        slot: _ShardSlot,
        action: str,
        fn: Callable[[qe.EdgeShard], _T],
        if_missing: _T,
        create: bool,
    ) -> _T:
        with self._holding(slot, action):
            shard = self._open(slot, create)
            return if_missing if shard is None else fn(shard)

    @contextmanager
    def _holding(self, slot: _ShardSlot, action: str) -> Iterator[None]:
        """Hold the slot's lock on an open store; report failures as VectorStoreError."""
        with slot.lock:
            if self._closed:
                raise VectorStoreError("the embedded vector store is closed")
            try:
                yield
            except VectorStoreError:
                raise
            except Exception as exc:  # qdrant-edge raises bare Exception for everything
                raise VectorStoreError(
                    f"embedded vector store could not {action} in {slot.path}: {exc}"
                ) from exc

    def _open(self, slot: _ShardSlot, create: bool) -> qe.EdgeShard | None:
        """The slot's shard, loading it from disk or creating it on first use."""
        if slot.shard is not None:
            return slot.shard
        config = self._edge_config()
        if slot.path.is_dir():
            # Reopening after a restart: create() refuses a folder that holds segments.
            shard = qe.EdgeShard.load(str(slot.path), config)
        elif create:
            shard = qe.EdgeShard.create(str(slot.path), config)
        else:
            return None
        _ensure_payload_indexes(shard)
        slot.shard = shard
        return shard

    def _edge_config(self) -> qe.EdgeConfig:
        return qe.EdgeConfig(
            vectors={
                DENSE_VECTOR: qe.EdgeVectorParams(
                    size=self._config.dense_dim, distance=qe.Distance.Cosine
                )
            },
            sparse_vectors={SPARSE_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            # Searches run on the caller's worker thread budget, not a per-shard pool.
            max_search_threads=1,
        )

    def _drop(self, slot: _ShardSlot) -> None:
        with self._holding(slot, "drop the shard"):
            if slot.shard is not None:
                slot.shard.close()
                slot.shard = None
            # A half-removed folder would still hold the tenant's data: report, don't ignore.
            with suppress(FileNotFoundError):
                shutil.rmtree(slot.path)

    def _close_all(self) -> None:
        with self._slots_guard:
            slots = list(self._slots.values())
        failed: list[str] = []
        for slot in slots:
            try:
                _close_slot(slot)
            except Exception as exc:  # keep closing the others; report them all at the end
                failed.append(f"{slot.path}: {exc}")
        self._lock_file.close()  # closing the descriptor releases the flock
        if failed:
            raise VectorStoreError("could not flush and close shards: " + "; ".join(failed))


def _lock_root(root: Path) -> IO[bytes]:
    """Hold an exclusive lock on ``root`` so a second process cannot open its shards."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_file = (root / LOCK_FILE_NAME).open("ab")
    except OSError as exc:
        raise VectorStoreError(f"cannot use vector store folder {root}: {exc}") from exc
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock_file.close()
        raise VectorStoreError(
            f"vector store folder {root} is in use by another process; embedded shards open "
            "in one process only, so run workers as threads of the API process or set "
            "QDRANT_URL to use a Qdrant server"
        ) from exc
    return lock_file


def _close_slot(slot: _ShardSlot) -> None:
    with slot.lock:
        if slot.shard is not None:
            slot.shard.flush()
            slot.shard.close()
            slot.shard = None


def _ensure_payload_indexes(shard: qe.EdgeShard) -> None:
    """Create missing payload indexes; checked on every open in case creation was cut off."""
    existing = shard.info().payload_schema
    for key, schema in _PAYLOAD_INDEXES.items():
        if key not in existing:
            shard.update(qe.UpdateOperation.create_field_index(key, schema))


def _updater(operation: qe.UpdateOperation) -> Callable[[qe.EdgeShard], None]:
    return lambda shard: shard.update(operation)


def _as_uuid(point_id: int | UUID | str) -> UUID:
    return point_id if isinstance(point_id, UUID) else UUID(str(point_id))


# --- translation into qdrant-edge models ----------------------------------------------


def _to_edge_point(point: ChunkPoint) -> qe.Point:
    vectors: dict[str, qe.NamedVector] = {
        DENSE_VECTOR: point.dense,
        SPARSE_VECTOR: _to_edge_sparse(point.sparse),
    }
    return qe.Point(point.id, vectors, dict(point.payload))


def _to_edge_sparse(vector: SparseVector) -> qe.SparseVector:
    return qe.SparseVector(list(vector.indices), list(vector.values))


def _to_edge_query(q: HybridQuery) -> qe.QueryRequest:
    edge_filter = None if q.filter is None else _to_edge_filter(q.filter)
    if q.dense is not None and q.sparse is not None:
        # The top-level filter also applies to both prefetches.
        prefetches = [
            qe.Prefetch(q.prefetch_limit, qe.Query.Nearest(q.dense, using=DENSE_VECTOR),
                        score_threshold=q.dense_threshold),
            qe.Prefetch(
                q.prefetch_limit,
                qe.Query.Nearest(_to_edge_sparse(q.sparse), using=SPARSE_VECTOR),
                score_threshold=q.sparse_threshold,
            ),
        ]
        fusion = cast(qe.Fusion, qe.Fusion.Rrf(k=RRF_K))  # stubs type Rrf apart from Fusion
        return qe.QueryRequest(
            q.limit, query=fusion, prefetches=prefetches, filter=edge_filter, with_payload=True
        )
    if q.dense is not None:
        nearest = qe.Query.Nearest(q.dense, using=DENSE_VECTOR)
        threshold = q.dense_threshold
    else:
        assert q.sparse is not None  # check_query guarantees one of them
        nearest = qe.Query.Nearest(_to_edge_sparse(q.sparse), using=SPARSE_VECTOR)
        threshold = q.sparse_threshold
    return qe.QueryRequest(q.limit, query=nearest, filter=edge_filter, with_payload=True,
                           score_threshold=threshold)


def _to_edge_filter(flt: PointFilter) -> qe.Filter:
    # An empty `must` matches every point.
    return qe.Filter(must=[_to_edge_condition(c) for c in filter_clauses(flt)])


def _to_edge_condition(clause: Clause) -> qe.ConditionType:
    if isinstance(clause, Equals):
        return qe.FieldCondition(clause.key, match=qe.MatchValue(_edge_match_value(clause.value)))
    if isinstance(clause, OneOf):
        return qe.FieldCondition(clause.key, match=qe.MatchAny(list(clause.values)))
    if isinstance(clause, NoneOf):
        return qe.FieldCondition(clause.key, match=qe.MatchExcept(list(clause.values)))
    if isinstance(clause, Below):
        return qe.FieldCondition(clause.key, range=qe.RangeFloat(lt=float(clause.value)))
    if isinstance(clause, AnyGroup):
        groups: list[qe.ConditionType] = [
            qe.Filter(must=[_to_edge_condition(c) for c in group]) for group in clause.groups
        ]
        return qe.Filter(should=groups)
    raise TypeError(f"unknown filter clause {clause!r}")


def _edge_match_value(value: MetadataValue) -> MetadataValue:
    # qdrant-edge 0.9.0 reads a Python bool as the integer 0/1, so `True` never matches
    # a boolean payload value; numpy's bool_ is read as a real boolean.
    if isinstance(value, bool):
        return cast(bool, np.bool_(value))
    return value
