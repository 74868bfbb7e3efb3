"""Coalescing concurrent embedding calls into large model calls.

Ingestion workers embed one document (or one 32-chunk slice of it) at a time; a typical
document has a dozen or two chunks. The model is much faster per chunk on large batches
(less per-call overhead, length-sorted batches with little padding), so many small calls
lose a third of the throughput. One thread here owns the model: callers from any thread
queue their texts, and it runs them together once ``max_batch`` texts are waiting, every
registered participant (a document being processed, see :meth:`participant`) has queued
its texts, or ``max_wait_s`` has passed since the first one arrived.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

Embed = Callable[[Sequence[str]], list[list[float]]]


class ParallelEmbed:
    """``embed(texts)`` split over model replicas that run at once, one thread each.

    Why: a model pass on the CPU with torch's intra-op threads (one per core) waits at
    every operator for its slowest thread, so any other work taking a core for a moment
    (the worker's parsing, database commits, the vector store) stalls both; two
    single-threaded replicas on two cores lose only what is taken from each (2 cores,
    a neighbour process using a third of a core: 2 threads x 1 model fell from 31.5 to
    25.5 chunks/s, 1 thread x 2 replicas stayed at 33). The texts are dealt out in
    order of length, so each replica gets the same mix and finishes at the same time.
    Results are exactly ``embed(texts)``'s (same model, same passes).
    """

    def __init__(self, replicas: Sequence[Embed]) -> None:
        if not replicas:
            raise ValueError("ParallelEmbed needs at least one replica")
        self.replicas = list(replicas)
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="embed-replica")

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        """One embedding per text, in order."""
        n = min(len(self.replicas), len(texts))
        if n <= 1:
            return self.replicas[0](texts)
        by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        shares = [by_length[k::n] for k in range(n)]
        futures = [self._pool.submit(embed, [texts[i] for i in share])
                   for embed, share in zip(self.replicas, shares, strict=False)]
        out: list[list[float]] = [[] for _ in texts]
        for share, future in zip(shares, futures, strict=True):
            for i, vector in zip(share, future.result(), strict=True):
                out[i] = vector
        return out

    def close(self) -> None:
        """Stop the replicas' threads (after what runs now)."""
        self._pool.shutdown(wait=True)


@dataclass
class _Request:
    texts: Sequence[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[float]] | None = None
    error: BaseException | None = None


class EmbeddingBatcher:
    """Thread-safe ``embed(texts)`` that batches across callers; same results as ``embed``."""

    def __init__(self, embed: Embed, max_batch: int = 128, max_wait_s: float = 0.02,
                 eager_batch: int | None = None) -> None:
        self._embed = embed
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # Once this many texts wait, run at once instead of waiting for the remaining
        # participants: texts queued while the model was busy keep it busy (the callers
        # of the last batch are still storing their results).
        self.eager_batch = eager_batch if eager_batch is not None else max_batch
        self._pending: list[_Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self._participants = 0
        self._thread = threading.Thread(target=self._serve, name="embedding-batcher",
                                        daemon=True)
        self._thread.start()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embeddings of ``texts`` in order; blocks until the batch containing them ran."""
        if not texts:
            return []
        request = _Request(texts)
        with self._cv:
            if self._closed:
                raise RuntimeError("the embedding batcher is closed")
            self._pending.append(request)
            self._cv.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    @contextmanager
    def participant(self) -> Iterator[Callable[[], None]]:
        """Mark a caller that will embed soon (a document in flight): while it is
        registered, a batch waits for its texts (up to ``max_wait_s``), which keeps
        batches large when several documents are processed at once. It yields ``leave``:
        a caller done embedding calls it (idempotent) so that batches stop waiting for
        it while it stores its results; leaving the block leaves too."""
        with self._cv:
            self._participants += 1
        left = False

        def leave() -> None:
            nonlocal left
            with self._cv:
                if not left:
                    left = True
                    self._participants -= 1
                    self._cv.notify()

        try:
            yield leave
        finally:
            leave()

    def close(self) -> None:
        """Finish what is queued, then stop the batching thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Request] | None:
        with self._cv:
            while not self._pending:
                if self._closed:
                    return None
                self._cv.wait()
            deadline = time.monotonic() + self.max_wait_s
            while (self._size() < self.eager_batch and not self._closed
                   and len(self._pending) < self._participants):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            return self._take()

    def _size(self) -> int:
        return sum(len(r.texts) for r in self._pending)

    def _take(self) -> list[_Request]:
        """Whole requests up to ``max_batch`` texts (always at least one request)."""
        taken: list[_Request] = []
        total = 0
        while self._pending and (not taken or total + len(self._pending[0].texts)
                                 <= self.max_batch):
            request = self._pending.pop(0)
            taken.append(request)
            total += len(request.texts)
        return taken

    def _run(self, batch: list[_Request]) -> None:
        texts = [t for r in batch for t in r.texts]
        try:
            vectors = self._embed(texts)
        except BaseException as exc:
            for r in batch:
                r.error = exc
                r.done.set()
            return
        offset = 0
        for r in batch:
            r.result = vectors[offset:offset + len(r.texts)]
            offset += len(r.texts)
            r.done.set()
