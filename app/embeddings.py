"""The text models the service shares: dense embedder, BM25 encoder, chunking tokenizer.

Loaded once per process (the API's lifespan or a worker's start-up), never at import.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.settings import IngestSettings
from ingestion import TokenCounter, load_token_counter
from retrieval.batching import Embed, ParallelEmbed
from retrieval.embedding import DenseEmbedder, EmbeddingConfig, SparseEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Models:
    """What turns text into vectors, and counts its tokens for chunking."""

    dense: DenseEmbedder
    sparse: SparseEncoder
    counter: TokenCounter


def load_models(settings: IngestSettings) -> Models:
    """Load the configured embedding model (offline) and its tokenizer."""
    started = time.monotonic()
    dense = DenseEmbedder(EmbeddingConfig(
        model=settings.embedding_model, device=settings.embedding_device,
        batch_size=settings.embedding_batch_size,
    ))
    model_dir = Path(settings.embedding_model) if settings.embedding_model else None
    counter = load_token_counter(model_dir)
    log.info("loaded embedding model %s in %.1fs", dense.model_name, time.monotonic() - started)
    return Models(dense=dense, sparse=SparseEncoder(), counter=counter)


def embedding_replicas(settings: IngestSettings) -> int:
    """How many model replicas a worker runs: the setting, else one per usable core on
    the CPU (one thread each) and one on an accelerator."""
    if settings.embedding_replicas is not None:
        return settings.embedding_replicas
    return len(os.sched_getaffinity(0)) if settings.embedding_device == "cpu" else 1


@contextmanager
def parallel_embedding(models: Models, settings: IngestSettings) -> Iterator[Embed]:
    """The worker's embed: `embedding_replicas` replicas in parallel, torch's intra-op
    threads shared out between them for as long as this is open (the setting is the
    process's: in the embedded stack, query embedding in the same process gets the
    share too), restored after."""
    replicas = embedding_replicas(settings)
    if replicas <= 1:
        yield models.dense.embed
        return
    import torch  # loaded with the model already

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // replicas))
    embed = ParallelEmbed([models.dense.embed,
                           *(models.dense.replica().embed for _ in range(replicas - 1))])
    log.info("embedding with %d model replicas, %d torch thread(s) each", replicas,
             torch.get_num_threads())
    try:
        yield embed
    finally:
        embed.close()
        torch.set_num_threads(before)


def check_vector_size(models: Models, dense_dim: int) -> None:
    """Refuse to start when the model's vectors do not fit the vector store's collections."""
    if models.dense.dim != dense_dim:
        raise ValueError(
            f"the embedding model {models.dense.model_name} gives {models.dense.dim}-dimensional "
            f"vectors but QDRANT_DENSE_DIM is {dense_dim}; set QDRANT_DENSE_DIM="
            f"{models.dense.dim} (a new dimension needs new collections: re-ingest)"
        )
