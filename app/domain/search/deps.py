"""The search area's provider: the retrieval service over the app's database, vector
store, models and reranker (the chat service is built with it too)."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.search.service import SearchService


def provide_search(state: State) -> SearchService:
    """The retrieval service."""
    return SearchService(state.db, state.vector_store, state.models, state.settings.chat,
                         state.reranker)


DEPENDENCIES = {"search": Provide(provide_search, sync_to_thread=False)}
