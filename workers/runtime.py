"""A worker process's long-lived clients and background loops.

Dramatiq runs actors in plain threads; our services are async. The runtime owns one
event loop in a thread of its own, with the database pool, vector store and models
built once; actors hand it coroutines with :meth:`WorkerRuntime.call`. The same loop
runs the outbox relay and the stuck-document sweeper.

Actors find the runtime through :func:`current` (one per process, set by ``start``):
like Dramatiq's own global broker, it is process-wide by nature.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import dramatiq

from app.db.engine import Database
from app.domain.knowledge.pipeline import IngestPipeline, isolated_parser
from app.domain.knowledge.sweeper import StuckDocumentSweeper
from app.embeddings import Models, check_vector_size, load_models, parallel_embedding
from app.hardening import refuse_inspection
from app.inference.pools import configured_prices
from app.outbox import DELETE_STALE_VERSIONS, INGEST_DOCUMENT
from app.settings import Settings
from app.stores import open_database, open_store
from retrieval.batching import EmbeddingBatcher
from retrieval.vectorstore import VectorStore
from workers.relay import OutboxRelay

log = logging.getLogger(__name__)
T = TypeVar("T")
_current: WorkerRuntime | None = None


def current() -> WorkerRuntime:
    """The running runtime of this process (actors call this)."""
    if _current is None:
        raise RuntimeError("the worker runtime is not started in this process")
    return _current


class WorkerRuntime:
    """Event loop + clients for actors, and the relay/sweeper background loops."""

    def __init__(self, settings: Settings, broker: dramatiq.Broker,
                 store: VectorStore | None = None, models: Models | None = None) -> None:
        self.settings = settings
        self.broker = broker
        self._given_store = store
        self._models = models
        self._loop = asyncio.new_event_loop()
        # The pipeline's blocking steps (chunking, embedding) run via asyncio.to_thread; the
        # default pool (cores + 4 threads) would cap the documents in flight, and with them
        # the size of the embedding batches.
        self._loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.worker.threads + 4, thread_name_prefix="pipeline"))
        self._thread = threading.Thread(target=self._loop.run_forever, name="worker-runtime",
                                        daemon=True)
        self._stack = AsyncExitStack()
        self._background: list[concurrent.futures.Future[None]] = []
        # Set when a document finishes here: its tenant's next one is released at once.
        self._relay_wake = asyncio.Event()
        self.db: Database
        self.store: VectorStore
        self.pipeline: IngestPipeline

    def start(self) -> None:
        """Load models, open clients, start the relay and sweeper, become ``current()``."""
        global _current
        models = self._models or load_models(self.settings.ingest)
        check_vector_size(models, self.settings.qdrant.dense_dim)
        self._thread.start()
        self.call(self._open(models))
        self._background = [
            asyncio.run_coroutine_threadsafe(self._every(
                self.settings.ingest.relay_interval_s, self._relay.relay_once,
                self._relay_wake), self._loop),
            asyncio.run_coroutine_threadsafe(self._every(
                self.settings.ingest.sweep_interval_s, self._sweeper.sweep), self._loop),
        ]
        _current = self

    def call(self, work: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the runtime's loop from an actor thread; wait for it."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def wake_relay(self) -> None:
        """A document finished: run the relay now rather than at its next tick."""
        with contextlib.suppress(RuntimeError):  # the loop already closed (shutting down)
            self._loop.call_soon_threadsafe(self._relay_wake.set)

    def stop(self) -> None:
        """Stop background loops, close clients we opened, stop the loop."""
        global _current
        if _current is self:
            _current = None
        for future in self._background:
            future.cancel()
        if self._thread.is_alive():
            self.call(self._stack.aclose(), timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def _open(self, models: Models) -> None:
        s = self.settings
        # Each document in flight holds one connection for its lease and uses another for
        # its transactions; a smaller pool would make worker threads wait on each other.
        self.db = await open_database(self._stack, s, "worker",
                                      min_pool_size=2 * s.worker.threads + 2)
        refuse_inspection("worker")  # its secrets unreadable to the parsers' user
        self.store = (open_store(self._stack, s) if self._given_store is None
                      else self._given_store)  # embedded mode: the API process's own store
        embed = self._stack.enter_context(parallel_embedding(models, s.ingest))
        batcher = EmbeddingBatcher(embed, max_batch=s.ingest.coalesce_max_texts,
                                   max_wait_s=s.ingest.coalesce_wait_s,
                                   eager_batch=s.ingest.coalesce_eager_texts)
        self._stack.callback(batcher.close)
        parser = isolated_parser(s.ingest)
        self._stack.callback(parser.close)
        self.pipeline = IngestPipeline(self.db, self.store, models, s.ingest, batcher,
                                       configured_prices(s), parser)
        self._relay = OutboxRelay(self.db, self.broker, {
            INGEST_DOCUMENT: {"time_limit": s.ingest.message_time_limit_s * 1000},
            DELETE_STALE_VERSIONS: {"delay": int(s.ingest.stale_version_grace_s * 1000)},
        }, tenant_inflight=s.ingest.tenant_inflight or 2 * s.worker.threads)
        self._sweeper = StuckDocumentSweeper(self.db, s.ingest)

    @staticmethod
    async def _every(interval: float, work: Callable[[], Awaitable[int]],
                     wake: asyncio.Event | None = None) -> None:
        """Run ``work`` forever (sooner when ``wake`` is set); back off after errors
        (e.g. PostgreSQL restarting)."""
        while True:
            delay = interval
            try:
                if await work():
                    delay = 0  # more may be waiting
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background loop %s failed; retrying", work.__qualname__)
                delay = max(interval, 2.0)
                await asyncio.sleep(delay)  # a back-off is not cut short by wake-ups
                continue
            await _pause(delay, wake)


async def _pause(delay: float, wake: asyncio.Event | None) -> None:
    """Sleep ``delay`` seconds, or until ``wake`` is set (then clear it)."""
    if wake is None or delay == 0:
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), delay)
    wake.clear()
