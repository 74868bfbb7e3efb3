"""The embed area's provider: embed tokens and allowed origins, built per request."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.embed.service import EmbedService
from app.settings import Settings


def provide_embed(state: State) -> EmbedService:
    """Embed tokens and allowed origins."""
    settings: Settings = state.settings
    return EmbedService(state.db, state.embed_signer, settings.auth)


DEPENDENCIES = {"embed": Provide(provide_embed, sync_to_thread=False)}
