"""Retrieval-augmented chat: OpenAI-compatible completions, citations, conversations."""

from app.domain.chat.controllers import ConversationController, chat_completions
from app.domain.chat.deps import DEPENDENCIES

ROUTES = [chat_completions, ConversationController]
__all__ = ["DEPENDENCIES", "ROUTES"]
