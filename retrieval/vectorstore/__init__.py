"""Per-tenant vector storage: one interface, an embedded and a server implementation."""

from retrieval.vectorstore.base import (
    ChunkPoint,
    HybridQuery,
    PointFilter,
    ScoredChunk,
    SparseVector,
    VectorStore,
    VectorStoreConfig,
    VectorStoreError,
    store_name,
)
from retrieval.vectorstore.edge import EmbeddedVectorStore
from retrieval.vectorstore.server import QdrantServerVectorStore

__all__ = [
    "ChunkPoint",
    "EmbeddedVectorStore",
    "HybridQuery",
    "PointFilter",
    "QdrantServerVectorStore",
    "ScoredChunk",
    "SparseVector",
    "VectorStore",
    "VectorStoreConfig",
    "VectorStoreError",
    "open_vector_store",
    "store_name",
]


def open_vector_store(settings: VectorStoreConfig) -> VectorStore:
    """Build the configured vector store; call once in the app's lifespan and close it there.

    The embedded store locks its root folder, so a second process opening the same
    folder gets a VectorStoreError here.
    """
    if settings.backend == "embedded":
        return EmbeddedVectorStore(settings)
    if settings.backend == "server":
        return QdrantServerVectorStore(settings)
    raise ValueError(f"unknown vector store backend {settings.backend!r}")
