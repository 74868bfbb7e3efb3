"""How settings map onto the storage clients' own configuration."""

from __future__ import annotations

from app.settings import Settings
from retrieval.vectorstore import VectorStoreConfig


def vector_store_config(settings: Settings) -> VectorStoreConfig:
    """Server mode when QDRANT_URL is set, else embedded shards under the data folder."""
    q = settings.qdrant
    if q.url:
        key = q.api_key.get_secret_value() if q.api_key else None
        return VectorStoreConfig(backend="server", url=q.url, api_key=key,
                                 dense_dim=q.dense_dim, timeout_s=q.timeout_s)
    return VectorStoreConfig(backend="embedded", path=settings.vector_path(),
                             dense_dim=q.dense_dim, timeout_s=q.timeout_s)
