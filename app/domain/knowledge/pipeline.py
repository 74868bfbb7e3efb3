"""The ingestion pipeline a worker runs for one document version.

claim (queued -> processing) -> parse -> chunk -> embed -> upsert points with ids derived
from (document, version, chunk index) -> publish: the new version becomes live, with its
extracted text and chunks kept for inspection (`indexed.py`), in one transaction ->
delete the older versions' points. Re-running any step is harmless: the
point ids are deterministic and publish checks that this version is still the newest.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlmodel import col, delete, update
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import Document, DocumentContent, DocumentStatus, Tenant, UsageEvent, utcnow
from app.domain.knowledge import embedding_quota, indexed, unsettled
from app.domain.knowledge.indexed import Extracted
from app.embeddings import Models
from app.outbox import DELETE_STALE_VERSIONS, enqueue
from app.quotas.costs import ModelPrice, token_cost
from app.quotas.policy import effective_limit
from app.quotas.usage import EMBEDDING, add_event
from app.settings import IngestSettings
from ingestion import (
    Chunk,
    ChunkingConfig,
    IngestionError,
    IsolatedParser,
    ProcessLimits,
    chunk_document,
    instruction_reasons,
)
from retrieval.batching import EmbeddingBatcher
from retrieval.vectorstore import ChunkPoint, PointFilter, VectorStore

log = logging.getLogger(__name__)
POINT_NAMESPACE = uuid.UUID("8f4d1c1e-7b0a-4c55-9f57-2d0c6a3e5b11")
FILTERABLE_METADATA = (str, int, bool)  # what vector-store filters can match
UPSERT_BATCH = 32
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:k)")
_UNLOCK = text("SELECT pg_advisory_unlock(:k)")


def lease_key(document_id: uuid.UUID) -> int:
    """The advisory-lock key of a document: its first 64 bits as a signed bigint, the same
    as ``LEASE_KEY_SQL`` computes in PostgreSQL (the sweeper checks leases there)."""
    top = document_id.int >> 64
    return top - (1 << 64) if top >= (1 << 63) else top


LEASE_KEY_SQL = "('x' || translate({column}::text, '-', ''))::bit(64)::bigint"


def point_id(document_id: uuid.UUID, version: int, index: int) -> uuid.UUID:
    """The same chunk of the same version always gets the same id (no duplicates)."""
    return uuid.uuid5(POINT_NAMESPACE, f"{document_id}:{version}:{index}")


@dataclass(frozen=True)
class Claimed:
    """A document version this worker now owns, with its bytes."""

    document: Document
    data: bytes
    embedding_limit: int | None = None  # the tenant's monthly embedding tokens, if capped


class IngestPipeline:
    """Runs one document version end to end; transient failures raise (to be retried)."""

    def __init__(self, db: Database, store: VectorStore, models: Models,
                 settings: IngestSettings, batcher: EmbeddingBatcher | None = None,
                 prices: Mapping[str, ModelPrice] | None = None,
                 parser: IsolatedParser | None = None) -> None:
        self.db = db
        # Parses each file in a child process bounded in time and memory (the caller
        # that passes one closes it; ours ends its helpers with the process).
        self.parser = parser or isolated_parser(settings)
        self.prices = prices or {}
        self.store = store
        self.models = models
        # Workers pass a batcher that merges concurrent documents into large model calls.
        self.batcher = batcher
        self.embed = batcher.embed if batcher else models.dense.embed
        self.settings = settings
        self.chunking = ChunkingConfig(max_tokens=settings.chunk_max_tokens,
                                       overlap_tokens=settings.chunk_overlap_tokens)

    async def run(self, tenant_id: uuid.UUID, document_id: uuid.UUID, version: int) -> None:
        """Ingest ``version`` of the document, unless it is gone, superseded, done, or
        being processed right now by another live worker."""
        async with self._lease(document_id) as owned:
            if not owned:
                log.info("document %s is being processed by another worker", document_id)
                return
            with self.batcher.participant() if self.batcher else nullcontext(_stay) as done:
                await self._run_owned(tenant_id, document_id, version, done)

    @asynccontextmanager
    async def _lease(self, document_id: uuid.UUID) -> AsyncIterator[bool]:
        """A PostgreSQL advisory lock held on its own connection while we work: a worker
        that dies loses its connection and so its lease, and the next delivery of the
        message (or the sweeper's re-send) can take over at once; a duplicate delivery
        while the owner is alive does nothing."""
        key = lease_key(document_id)
        async with self.db.engine.connect() as conn:
            owned = bool(await conn.scalar(_TRY_LOCK, {"k": key}))
            try:
                yield owned
            finally:
                if owned:
                    await conn.execute(_UNLOCK, {"k": key})
                await conn.rollback()

    async def _run_owned(self, tenant_id: uuid.UUID, document_id: uuid.UUID, version: int,
                         done_embedding: Callable[[], None]) -> None:
        claimed = await self.claim(tenant_id, document_id, version)
        if claimed is None:
            return
        doc = claimed.document
        try:
            extracted = await asyncio.to_thread(self._chunk, claimed.data, doc.format)
        except IngestionError as exc:
            await self.fail(tenant_id, document_id, version, f"{type(exc).__name__}: {exc}")
            return
        chunks = extracted.chunks
        refusal = await self._over_quota(claimed, chunks)
        if refusal is not None:
            await self.fail(tenant_id, document_id, version, refusal)
            return
        await self._progress(tenant_id, doc, chunk_count=len(chunks), chunks_embedded=0)
        for start in range(0, len(chunks), UPSERT_BATCH):
            # Batches bound memory on big documents; a crash leaves a prefix of points
            # that the next attempt overwrites (same ids), never duplicates.
            batch = chunks[start:start + UPSERT_BATCH]
            points = await asyncio.to_thread(self._points, doc, batch)
            if start + UPSERT_BATCH >= len(chunks):
                # The model's next batch need not wait for us while we store and publish:
                # its callers are the documents still to embed (the next batch is ready
                # when this one ends, so the model does not idle between them).
                done_embedding()
            await self.store.upsert(tenant_id, points)
            await self._progress(tenant_id, doc, chunks_embedded=start + len(batch))
        if not await self.publish(tenant_id, document_id, version, extracted):
            # Deleted or superseded while we worked: no reader can match these points.
            await self.store.delete(tenant_id, PointFilter(document_id=document_id,
                                                           version=version))
            return
        log.info("document %s v%d ready: %d chunks", document_id, version, len(chunks))

    async def claim(
        self, tenant_id: uuid.UUID, document_id: uuid.UUID, version: int
    ) -> Claimed | None:
        """Move the version to ``processing``; None if there is nothing to do."""
        async with self.db.tenant(tenant_id) as session:
            doc = await _newest(session, document_id, version)
            if doc is None or doc.status == DocumentStatus.failed:
                return None
            if doc.status == DocumentStatus.ready and doc.live_version == version:
                return None
            if doc.attempts >= self.settings.max_attempts:
                _mark_failed(doc, f"gave up after {doc.attempts} attempts; last error: "
                                  f"{doc.error or 'the worker stopped while processing it'}")
                session.add(doc)
                return None
            content = await session.get(DocumentContent, (document_id, version))
            if content is None:
                _mark_failed(doc, "the uploaded bytes of this version are missing")
                session.add(doc)
                return None
            doc.status, doc.attempts = DocumentStatus.processing, doc.attempts + 1
            doc.processing_started_at = doc.updated_at = utcnow()
            session.add(doc)
            # Before any point of this version is written, search hides it.
            await unsettled.mark(session, tenant_id, document_id, unsettled.DOCUMENT, doc.kb_id)
            tenant = await session.get(Tenant, tenant_id)
            limit = effective_limit(tenant, embedding_quota.QUOTA) if tenant else None
            return Claimed(document=doc, data=content.data, embedding_limit=limit)

    async def _over_quota(self, claimed: Claimed, chunks: list[Chunk]) -> str | None:
        """Why embedding these chunks would pass the tenant's monthly quota (None: it
        fits, or there is none). Checked before any embedding work is spent."""
        if claimed.embedding_limit is None:
            return None
        tokens = sum(c.token_count for c in chunks)
        tenant_id, now = claimed.document.tenant_id, utcnow()
        async with self.db.tenant(tenant_id) as session:
            used = await embedding_quota.tokens_used(session, tenant_id, now)
        allowance = embedding_quota.EmbeddingAllowance(claimed.embedding_limit, used, now)
        refusal = allowance.refusal(adding=tokens)
        return None if refusal is None else embedding_quota.not_embedded(refusal)

    async def _progress(self, tenant_id: uuid.UUID, doc: Document, **columns: int) -> None:
        """Show admins how far processing is (chunks found, chunks embedded so far)."""
        stmt = (update(Document)
                .where(col(Document.id) == doc.id, col(Document.version) == doc.version)
                .values(**columns, updated_at=utcnow()))
        async with self.db.tenant(tenant_id) as session:
            await (await session.connection()).execute(stmt)

    async def publish(
        self, tenant_id: uuid.UUID, document_id: uuid.UUID, version: int, extracted: Extracted,
    ) -> bool:
        """Make ``version`` the live one atomically, keep its extracted text and chunks
        in place of the older version's, and queue the older versions' points for
        deletion after a grace period; False if this version is no longer wanted.
        The version's embedding tokens are metered in the same transaction, once (its
        request id is the version's)."""
        chunk_count = len(extracted.chunks)
        rows = await asyncio.to_thread(indexed.chunk_rows, tenant_id, document_id, version,
                                       extracted.chunks)
        async with self.db.tenant(tenant_id) as session:
            doc = await _newest(session, document_id, version)
            if doc is None:
                return False
            await add_event(session, self._embedding_event(doc, extracted.tokens))
            first_stale = doc.live_version or 1
            doc.live_version, doc.chunk_count = version, chunk_count
            doc.chunks_embedded = chunk_count
            doc.status = DocumentStatus.ready
            doc.error, doc.ready_at = None, utcnow()
            doc.updated_at = doc.ready_at
            session.add(doc)
            await indexed.keep(session, doc, extracted.text, rows)
            await (await session.connection()).execute(delete(DocumentContent).where(
                col(DocumentContent.document_id) == document_id,
                col(DocumentContent.version) < version,
            ))
            if first_stale < version:
                enqueue(session, tenant_id, DELETE_STALE_VERSIONS, document_id=str(document_id),
                        below=version)
            else:  # the first version: nothing else was ever stored
                await unsettled.settle(session, document_id)
        return True

    async def purge_stale_versions(
        self, tenant_id: uuid.UUID, document_id: uuid.UUID, below: int
    ) -> None:
        """Delete the points of every version older than ``below``; once only the live
        version is stored, search stops special-casing the document."""
        await self.store.delete(tenant_id, PointFilter(document_id=document_id,
                                                       version_below=below))
        async with self.db.tenant(tenant_id) as session:
            doc = await session.get(Document, document_id, with_for_update=True)
            # Not if a newer version is in flight (its publish purges again) or failed
            # (its partial points stay hidden) or the document was deleted.
            if doc is not None and doc.live_version == doc.version == below:
                await unsettled.settle(session, document_id)

    async def purge_document(self, tenant_id: uuid.UUID, document_id: uuid.UUID) -> None:
        """Delete every point of a deleted document."""
        await self.store.delete(tenant_id, PointFilter(document_id=document_id))
        async with self.db.tenant(tenant_id) as session:
            if await session.get(Document, document_id) is None:
                await unsettled.settle(session, document_id)

    async def purge_kb(self, tenant_id: uuid.UUID, kb_id: uuid.UUID) -> None:
        """Delete every point of a deleted knowledge base."""
        await self.store.delete(tenant_id, PointFilter(kb_ids=[kb_id]))
        async with self.db.tenant(tenant_id) as session:
            await unsettled.settle_kb(session, kb_id)

    async def fail(
        self, tenant_id: uuid.UUID, document_id: uuid.UUID, version: int, reason: str
    ) -> None:
        """Permanent failure: ``failed`` with a reason an admin can read; no retry."""
        async with self.db.tenant(tenant_id) as session:
            doc = await _newest(session, document_id, version)
            if doc is not None:
                _mark_failed(doc, reason)
                session.add(doc)
        log.warning("document %s v%d failed: %s", document_id, version, reason)

    async def note_transient_error(
        self, tenant_id: uuid.UUID, document_id: uuid.UUID, version: int, reason: str
    ) -> None:
        """Record why an attempt failed (it will be retried) so admins can see it."""
        async with self.db.tenant(tenant_id) as session:
            doc = await _newest(session, document_id, version)
            if doc is not None and doc.status != DocumentStatus.ready:
                doc.error = f"attempt {doc.attempts} failed, will retry: {reason}"[:2000]
                doc.status, doc.updated_at = DocumentStatus.queued, utcnow()
                doc.queued_at = doc.updated_at
                session.add(doc)

    def _embedding_event(self, doc: Document, tokens: int) -> UsageEvent:
        """The usage event of embedding one document version."""
        model = self.models.dense.model_name
        started = doc.processing_started_at or utcnow()
        return UsageEvent(
            tenant_id=doc.tenant_id, request_id=f"ingest:{doc.id}:{doc.version}",
            kind=EMBEDDING, model=model, prompt_tokens=tokens, status="ok",
            latency_ms=max(0.0, (utcnow() - started).total_seconds() * 1000),
            cost_usd=token_cost(self.prices.get(model), tokens, 0))

    def _chunk(self, data: bytes, fmt: str) -> Extracted:
        parsed = self.parser.parse(data, fmt)  # type: ignore[arg-type]
        return Extracted(parsed.text,
                         chunk_document(parsed, self.models.counter, self.chunking))

    def _points(self, doc: Document, chunks: list[Chunk]) -> list[ChunkPoint]:
        texts = [c.text for c in chunks]
        dense = self.embed(texts)
        sparse = self.models.sparse.encode_documents(texts)
        meta = {k: v for k, v in doc.doc_metadata.items() if isinstance(v, FILTERABLE_METADATA)}
        return [
            ChunkPoint(id=point_id(doc.id, doc.version, c.index), dense=d, sparse=s,
                       payload=_payload(doc, c, meta))
            for c, d, s in zip(chunks, dense, sparse, strict=True)
        ]


def _stay() -> None:
    """Without a batcher there is no batch to leave."""


def isolated_parser(settings: IngestSettings) -> IsolatedParser:
    """The parser the settings ask for: time, memory and process limits."""
    limits = ProcessLimits(timeout_s=settings.parse_timeout_s,
                           memory_bytes=settings.parse_memory_mb * 2**20)
    return IsolatedParser(process_limits=limits, max_processes=settings.parse_processes)


def _payload(doc: Document, chunk: Chunk, meta: dict[str, Any]) -> dict[str, Any]:
    reasons = instruction_reasons(chunk.text)
    return {
        "kb_id": str(doc.kb_id), "document_id": str(doc.id), "version": doc.version,
        "chunk_index": chunk.index, "text": chunk.text, "start": chunk.start, "end": chunk.end,
        "page": chunk.page, "heading_path": list(chunk.heading_path),
        "filename": doc.filename, "meta": meta,
        # Reads like instructions to an AI: search results and the prompt say so.
        "suspected_instructions": bool(reasons), "instruction_reasons": reasons,
    }


async def _newest(session: AsyncSession, document_id: uuid.UUID, version: int) -> Document | None:
    """The document, locked, if ``version`` is still its newest upload; else None
    (deleted, or a newer version was uploaded while we worked)."""
    doc = await session.get(Document, document_id, with_for_update=True)
    return doc if doc is not None and doc.version == version else None


def _mark_failed(doc: Document, reason: str) -> None:
    doc.status, doc.error = DocumentStatus.failed, reason[:2000]
    doc.updated_at = utcnow()
