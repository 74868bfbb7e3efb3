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
from contextlib import contextmanager
from dataclasses import dataclass, field

Embed = Callable[[Sequence[str]], list[list[float]]]


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
    def participant(self) -> Iterator[None]:
        """Mark a caller that will embed soon (a document in flight): while it is
        registered, a batch waits for its texts (up to ``max_wait_s``), which keeps
        batches large when several documents are processed at once."""
        with self._cv:
            self._participants += 1
        try:
            yield
        finally:
            with self._cv:
                self._participants -= 1
                self._cv.notify()

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
