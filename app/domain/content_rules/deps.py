"""The content rules area's provider, built per request from the app's state."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.content_rules.service import ContentRulesService


def provide_content_rules(state: State) -> ContentRulesService:
    """The tenant's content rules."""
    return ContentRulesService(state.db)


DEPENDENCIES = {"content": Provide(provide_content_rules, sync_to_thread=False)}
