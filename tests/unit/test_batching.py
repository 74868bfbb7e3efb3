"""The embedding batcher returns exactly what a direct call would, to every caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from retrieval.batching import EmbeddingBatcher, ParallelEmbed


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


def test_a_caller_done_embedding_is_not_waited_for() -> None:
    """A document storing its points after its last embed leaves the batch's wait: the
    next caller's texts run at once, not after ``max_wait_s``."""
    model = CountingEmbed()
    batcher = EmbeddingBatcher(model, max_batch=1000, max_wait_s=5.0)
    with batcher.participant() as leave_storing:
        batcher.embed(["first"])  # alone: runs when the only participant has queued
        leave_storing()
        leave_storing()  # idempotent
        with batcher.participant():
            started = time.monotonic()
            assert batcher.embed(["second"]) == model(["second"])
            waited = time.monotonic() - started
    batcher.close()
    assert waited < 2.0  # not held for the 5 s wait on the one that left

    # Without leaving, the same call waits for the other participant up to max_wait_s.
    batcher = EmbeddingBatcher(model, max_batch=1000, max_wait_s=1.0)
    with batcher.participant(), batcher.participant():
        started = time.monotonic()
        batcher.embed(["third"])
        assert time.monotonic() - started >= 0.9
    batcher.close()


def test_parallel_embed_splits_over_replicas_and_keeps_order() -> None:
    replicas = [CountingEmbed(), CountingEmbed()]
    embed = ParallelEmbed(replicas)
    texts = [f"{chr(97 + i % 26)}{'x' * (i * 7 % 13)}" for i in range(41)]
    assert embed(texts) == CountingEmbed()(texts)
    assert sorted(n for r in replicas for n in r.calls) == [20, 21]  # once each, half each
    assert embed(["one"]) == CountingEmbed()(["one"])  # fewer texts than replicas
    embed.close()
    with pytest.raises(ValueError, match="at least one replica"):
        ParallelEmbed([])
