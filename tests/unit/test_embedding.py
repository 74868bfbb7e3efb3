"""Behaviour of the dense embedder (real packaged model) and the BM25 sparse encoder.

The sparse vectors are checked where they are used: stored in both vector-store
adapters, whose "bm25" vector applies the IDF modifier at query time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest

from retrieval.embedding import (
    DEFAULT_MODEL_NAME,
    DenseEmbedder,
    EmbeddingConfig,
    EmbeddingModelError,
    SparseEncoder,
)
from retrieval.vectorstore import (
    ChunkPoint,
    HybridQuery,
    SparseVector,
    VectorStore,
    VectorStoreConfig,
    open_vector_store,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning"),
]

PASSWORD_QUESTION = "How do I reset my password?"
PASSWORD_ANSWER = "Steps to recover your account password"
REVENUE = "Quarterly revenue grew by 12%"

# Every document mentions "report"; only one mentions "Kubernetes", and that one
# never says "report". Without IDF the report-heavy text would win "Kubernetes report".
LEXICAL_CORPUS = {
    "report-heavy": "Report, report, report: the weekly report repeats the report.",
    "rare-term": (
        "Our platform team moved the billing service to Kubernetes last spring; the "
        "migration notes list what changed and who owned each step."
    ),
    "sales": "The sales report for the quarter shows steady growth in every region.",
    "hiring": "The hiring report summarises open roles and interview feedback.",
    "incident": "An incident report describes the outage and its root cause.",
    "finance": "The finance report covers revenue, costs and the cash position.",
}
LEXICAL_QUERY = "Kubernetes report"


@pytest.fixture(scope="module")
def embedder() -> DenseEmbedder:
    """The packaged all-MiniLM-L6-v2, loaded once for the module (~9 s)."""
    return DenseEmbedder(EmbeddingConfig())


@pytest.fixture(scope="module")
def sparse() -> SparseEncoder:
    return SparseEncoder()


@pytest.fixture(params=["embedded", "server"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    if request.param == "embedded":
        config = VectorStoreConfig(backend="embedded", path=tmp_path / "vectors")
    else:
        config = VectorStoreConfig(backend="server", url=":memory:")
    vector_store = open_vector_store(config)
    yield vector_store
    await vector_store.close()


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- dense ---------------------------------------------------------------------------


def test_embeddings_have_model_dim_and_unit_norm(embedder: DenseEmbedder) -> None:
    vectors = embedder.embed([PASSWORD_QUESTION, "", "a " * 1000])
    assert embedder.dim == 384
    assert embedder.model_name == DEFAULT_MODEL_NAME
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(math.isclose(float(np.linalg.norm(v)), 1.0, abs_tol=1e-5) for v in vectors)


def test_similar_meaning_is_closer(embedder: DenseEmbedder) -> None:
    question, answer, revenue = embedder.embed([PASSWORD_QUESTION, PASSWORD_ANSWER, REVENUE])
    assert cosine(question, answer) > cosine(question, revenue) + 0.3


def test_batching_matches_one_by_one(embedder: DenseEmbedder) -> None:
    # Different lengths, so batches are padded; padding must not leak into results.
    texts = [f"Section {i}: " + "the tenant uploads a document. " * (i % 7 + 1) for i in range(40)]
    batched = np.array(embedder.embed(texts))
    single = np.array([embedder.embed([text])[0] for text in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_empty_input_does_not_touch_the_model(
    embedder: DenseEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was called")

    monkeypatch.setattr(embedder._model, "encode", refuse)
    assert embedder.embed([]) == []
    assert embedder.count_tokens([]) == []


def test_count_tokens_is_not_truncated(embedder: DenseEmbedder) -> None:
    counts = embedder.count_tokens(["hello world", "word " * 600, ""])
    assert counts == [2, 600, 0]
    assert embedder.max_seq_length == 256  # what embed() would have cut the long one to


def test_counting_while_embedding_does_not_break_either(embedder: DenseEmbedder) -> None:
    # Metering counts tokens on one thread while a worker embeds on another.
    texts = ["short", "a somewhat longer sentence about uploads", "word " * 300]
    expected, expected_counts = np.array(embedder.embed(texts)), embedder.count_tokens(texts)
    errors: list[BaseException] = []
    stop = threading.Event()

    def count_until_stopped() -> None:
        while not stop.is_set():
            if embedder.count_tokens(texts) != expected_counts:
                errors.append(AssertionError("token counts changed"))

    counter = threading.Thread(target=count_until_stopped)
    counter.start()
    try:
        for _ in range(6):
            np.testing.assert_allclose(np.array(embedder.embed(texts)), expected, atol=1e-5)
    finally:
        stop.set()
        counter.join()
    assert errors == []


def test_missing_model_folder_is_named() -> None:
    with pytest.raises(EmbeddingModelError, match=r"/nonexistent/model.*does not exist"):
        DenseEmbedder(EmbeddingConfig(model="/nonexistent/model"))


def test_uncached_model_name_fails_fast_without_download(embedder: DenseEmbedder) -> None:
    # `embedder` first, so sentence-transformers is already imported and this stays fast.
    name = "example-org/model-that-is-not-cached"
    with pytest.raises(EmbeddingModelError, match=rf"{name}.*never downloaded"):
        DenseEmbedder(EmbeddingConfig(model=name))


def test_batch_size_defaults_to_the_device_and_does_not_change_vectors(
        embedder: DenseEmbedder) -> None:
    assert EmbeddingConfig().batch_size == embedder.batch_size == 8  # CPU: small passes
    assert EmbeddingConfig(device="cuda").batch_size == 64
    assert EmbeddingConfig(batch_size=32).batch_size == 32
    texts = ["short", "a much longer text about the travel policy and its many rules " * 4,
             *(f"policy number {i}" for i in range(20))]
    assert np.allclose(embedder.embed(texts), embedder.embed(texts, batch_size=32), atol=1e-5)


def test_replicas_in_parallel_give_the_models_vectors(embedder: DenseEmbedder) -> None:
    import torch

    from retrieval.batching import ParallelEmbed

    texts = [f"rule {i}: " + "laptops must be locked " * (i % 9) for i in range(30)]
    replica = embedder.replica()
    assert replica._model is not embedder._model
    assert next(replica._model.parameters()) is next(embedder._model.parameters())  # shared
    threads = torch.get_num_threads()
    embed = ParallelEmbed([embedder.embed, replica.embed])
    try:
        torch.set_num_threads(1)
        assert np.allclose(embed(texts), embedder.embed(texts), atol=1e-5)
    finally:
        embed.close()
        torch.set_num_threads(threads)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EmbeddingConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_seq_length"):
        EmbeddingConfig(max_seq_length=0)


# --- sparse --------------------------------------------------------------------------


def test_query_weighs_distinct_terms_equally(sparse: SparseEncoder) -> None:
    query = sparse.encode_query("password password reset")
    document = sparse.encode_documents(["password password reset"])[0]
    assert query.indices == document.indices
    assert query.values == [1.0, 1.0]
    # The repeated term weighs more in the document, with saturation (below 2x).
    by_index = dict(zip(document.indices, document.values, strict=True))
    repeated = by_index[sparse.encode_query("password").indices[0]]
    once = by_index[sparse.encode_query("reset").indices[0]]
    assert once < repeated < 2 * once


def test_stemming_and_stopwords(sparse: SparseEncoder) -> None:
    assert sparse.encode_query("Resetting passwords") == sparse.encode_query("reset password")
    assert sparse.encode_query("the of and") == SparseVector(indices=[], values=[])
    assert sparse.encode_documents([]) == []


def raw_dot(query: SparseVector, document: SparseVector) -> float:
    weights = dict(zip(document.indices, document.values, strict=True))
    return sum(weights.get(i, 0.0) * v for i, v in zip(query.indices, query.values, strict=True))


async def test_rare_query_term_ranks_first_through_idf(
    store: VectorStore, sparse: SparseEncoder
) -> None:
    names = list(LEXICAL_CORPUS)
    documents = sparse.encode_documents(list(LEXICAL_CORPUS.values()))
    query = sparse.encode_query(LEXICAL_QUERY)
    # Term frequency alone prefers the text that repeats the common word...
    assert max(names, key=lambda n: raw_dot(query, documents[names.index(n)])) == "report-heavy"
    tenant = uuid4()
    dense = [1.0] + [0.0] * 383
    points = [
        ChunkPoint(uuid4(), dense, vector, {"name": name})
        for name, vector in zip(names, documents, strict=True)
    ]
    await store.upsert(tenant, points)
    hits = await store.query(tenant, HybridQuery(dense=None, sparse=query))
    # ...the store's IDF modifier makes the rare term decide.
    assert [hit.payload["name"] for hit in hits][:2] == ["rare-term", "report-heavy"]
    assert hits[0].score > 5 * hits[1].score


async def test_hybrid_search_finds_the_answer(
    store: VectorStore, embedder: DenseEmbedder, sparse: SparseEncoder
) -> None:
    texts = [PASSWORD_ANSWER, REVENUE, *LEXICAL_CORPUS.values()]
    tenant = uuid4()
    points = [
        ChunkPoint(uuid4(), dense, vector, {"text": text})
        for text, dense, vector in zip(
            texts, embedder.embed(texts), sparse.encode_documents(texts), strict=True
        )
    ]
    await store.upsert(tenant, points)
    query = HybridQuery(
        dense=embedder.embed([PASSWORD_QUESTION])[0],
        sparse=sparse.encode_query(PASSWORD_QUESTION),
        limit=3,
    )
    hits = await store.query(tenant, query)
    assert hits[0].payload["text"] == PASSWORD_ANSWER
