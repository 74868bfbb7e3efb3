"""The storage clients every process opens: the database pool (refusing a privileged
role) and the vector store, from the settings. The API's lifespan
(app/server/clients.py) and the worker runtime (workers/runtime.py) both open theirs
here, so the two cannot drift apart.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from app.db.engine import Database, make_engine
from app.db.role_check import refuse_privileged_role
from app.settings import Settings
from retrieval.vectorstore import VectorStore, VectorStoreConfig, open_vector_store


async def open_database(stack: AsyncExitStack, settings: Settings, who: str,
                        min_pool_size: int = 0) -> Database:
    """The app role's connection pool (at least ``min_pool_size``), closed with
    ``stack``; refuses to go on when the role may bypass row-level security."""
    config = settings.database
    if config.pool_size < min_pool_size:
        config = config.model_copy(update={"pool_size": min_pool_size})
    db = Database(make_engine(settings.database.application_url(), config))
    stack.push_async_callback(db.close)
    await refuse_privileged_role(db.engine, who)  # before serving any tenant
    return db


def open_store(stack: AsyncExitStack, settings: Settings) -> VectorStore:
    """The configured vector store, closed with ``stack``."""
    store = open_vector_store(vector_store_config(settings))
    stack.push_async_callback(store.close)
    return store


def vector_store_config(settings: Settings) -> VectorStoreConfig:
    """Server mode when QDRANT_URL is set, else embedded shards under the data folder."""
    q = settings.qdrant
    if q.url:
        key = q.api_key.get_secret_value() if q.api_key else None
        return VectorStoreConfig(backend="server", url=q.url, api_key=key,
                                 dense_dim=q.dense_dim, timeout_s=q.timeout_s)
    return VectorStoreConfig(backend="embedded", path=settings.vector_path(),
                             dense_dim=q.dense_dim, timeout_s=q.timeout_s)
