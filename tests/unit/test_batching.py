"""The embedding batcher returns exactly what a direct call would, to every caller."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from retrieval.batching import EmbeddingBatcher


class CountingEmbed:
    """A deterministic stand-in model: the vector of a text is [len(text), first char]."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        return [[float(len(t)), float(ord(t[0]))] for t in texts]


def test_concurrent_callers_get_their_own_results_in_fewer_model_calls() -> None:
    model = CountingEmbed()
    batcher = EmbeddingBatcher(model, max_batch=1000, max_wait_s=0.5)
    results: dict[int, list[list[float]]] = {}
    texts = {i: [f"{chr(97 + i)}{'x' * j}" for j in range(i + 1)] for i in range(8)}

    def call(i: int) -> None:
        with batcher.participant():
            results[i] = batcher.embed(texts[i])

    with batcher.participant():  # hold the batch until all eight callers are in
        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
    for t in threads:
        t.join(10)
    batcher.close()
    for i in range(8):
        assert results[i] == model(texts[i])
    assert sum(model.calls[:-8]) == sum(len(v) for v in texts.values())
    assert len(model.calls) - 8 < 8  # merged: fewer model calls than callers


def test_model_errors_reach_every_caller_of_the_batch() -> None:
    def broken(texts: Sequence[str]) -> list[list[float]]:
        raise RuntimeError("out of memory")

    batcher = EmbeddingBatcher(broken, max_wait_s=0.01)
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.embed(["a"])
    assert batcher.embed([]) == []
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.embed(["a"])
