"""Optional second-stage reranking with a cross-encoder (off by default: no reranker
weights ship offline; point ``CHAT_RERANK_MODEL`` at a local sentence-transformers
CrossEncoder folder to turn it on)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypeVar

from sentence_transformers import CrossEncoder

T = TypeVar("T")


class Reranker:
    """Scores (query, passage) pairs jointly; higher is more relevant."""

    def __init__(self, model_path: str, device: str | None = None) -> None:
        self._model = CrossEncoder(model_path, device=device, local_files_only=True)
        self._lock = threading.Lock()  # one forward pass at a time per model
        self.model_name = model_path

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        """One score per text, in order."""
        if not texts:
            return []
        with self._lock:
            raw = self._model.predict([(query, t) for t in texts], show_progress_bar=False)
        return [float(s) for s in raw]


def rerank(items: Sequence[T], scores: Sequence[float], top_k: int) -> list[tuple[T, float]]:
    """The ``top_k`` items by score, best first (stable for ties)."""
    if len(items) != len(scores):
        raise ValueError("one score per item is needed")
    order = sorted(range(len(items)), key=lambda i: -scores[i])
    return [(items[i], float(scores[i])) for i in order[:top_k]]
