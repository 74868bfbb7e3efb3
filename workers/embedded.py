"""Worker threads inside the API process, for the embedded (dev) stack.

They share the API's vector store (an embedded shard folder opens in one process only)
and its loaded models (one copy of the embedding model in memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from litestar import Litestar

from app.settings import Settings
from workers.process import start_workers


def embedded_workers(settings: Settings) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """A lifespan that runs Dramatiq worker threads for as long as the app runs."""

    @asynccontextmanager
    async def run(app: Litestar) -> AsyncIterator[None]:
        # An embedded store is shared (one process per shard folder); a server client is
        # bound to the API's event loop, so the runtime opens its own.
        shared = None if settings.qdrant.url else app.state.vector_store
        running = await asyncio.to_thread(start_workers, settings, shared, app.state.models)
        app.state.broker = running.broker
        try:
            yield
        finally:
            await asyncio.to_thread(running.stop)

    return run
