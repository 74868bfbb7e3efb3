"""The chat area's per-request provider: the conversation store. (The chat service
itself is built once per process by the composition root: app/server/clients.py.)"""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.chat.conversations import ConversationService


def provide_conversations(state: State) -> ConversationService:
    """The conversation store."""
    return ConversationService(state.db)


DEPENDENCIES = {"conversations": Provide(provide_conversations, sync_to_thread=False)}
