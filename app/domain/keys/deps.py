"""The key area's provider: the API key service, built per request from the app's state."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.keys.service import ApiKeyService


def provide_keys(state: State) -> ApiKeyService:
    """The API key service."""
    return ApiKeyService(state.db, state.settings.auth.key_pepper.get_secret_value())


DEPENDENCIES = {"keys": Provide(provide_keys, sync_to_thread=False)}
