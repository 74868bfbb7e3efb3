"""The optional cross-encoder rerank step.

No reranker weights ship offline, so the model under test is a CrossEncoder built on
the packaged MiniLM encoder with a freshly initialised (seeded) scoring head: the
scores mean nothing, but the plumbing (loading offline, one score per passage, order by
score, top-k) is the real code path.
"""

from __future__ import annotations

import pytest
import torch

from retrieval.embedding import packaged_model_dir
from retrieval.rerank import Reranker, rerank


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    torch.manual_seed(0)
    return Reranker(str(packaged_model_dir()), device="cpu")


def test_scores_one_per_passage_and_deterministic(reranker: Reranker) -> None:
    texts = ["Parents get 22 weeks of leave.", "The cafeteria opens at 8.", "Laptops: 36 months."]
    first = reranker.scores("parental leave", texts)
    assert len(first) == 3 and all(isinstance(s, float) for s in first)
    assert reranker.scores("parental leave", texts) == pytest.approx(first)
    assert reranker.scores("parental leave", []) == []


def test_rerank_orders_by_score_and_keeps_top_k() -> None:
    assert rerank(["a", "b", "c"], [0.1, 0.9, 0.5], 2) == [("b", 0.9), ("c", 0.5)]
    assert rerank(["a", "b"], [0.2, 0.2], 5) == [("a", 0.2), ("b", 0.2)]
    with pytest.raises(ValueError):
        rerank(["a"], [], 1)
