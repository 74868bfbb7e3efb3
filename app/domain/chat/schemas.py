"""The chat wire format: OpenAI's ``/v1/chat/completions`` request, plus our extras
(sent by OpenAI SDKs through ``extra_body``), the citations we add to responses, and the
``/v1/conversations`` responses (a conversation, its messages, a page of them)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app.domain.search.schemas import Filters
from app.text_fields import FREE_TEXT, SINGLE_LINE

Role = Literal["system", "developer", "user", "assistant"]
MAX_MESSAGES = 500
MAX_CONTENT_CHARS = 200_000  # one message's text, however it is split into parts
# All messages' text together: about 100k tokens of English, beyond any context window
# served here, and a thirtieth of the body limit (a request is refused before any work).
MAX_REQUEST_CHARS = 400_000


class TextPart(BaseModel):
    """A text part of a message's content list; other part types are refused."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_CONTENT_CHARS), FREE_TEXT]


class ChatMessage(BaseModel):
    """One message; content is a string or a list of text parts."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Annotated[str, FREE_TEXT] | list[TextPart]  # stored with the conversation
    name: Annotated[str, Field(max_length=64), SINGLE_LINE] | None = None

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        # A list's parts are joined with newlines (``text``): bound what is sent upstream.
        size = len(value) if isinstance(value, str) else \
            sum(len(part.text) + 1 for part in value) - 1
        if size > MAX_CONTENT_CHARS:
            raise ValueError(f"message content is longer than {MAX_CONTENT_CHARS} characters")
        return value

    @property
    def text(self) -> str:
        """The content as plain text."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class RetrievalOptions(BaseModel):
    """How (and whether) to ground the answer in the tenant's knowledge bases."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    top_k: Annotated[int | None, Field(ge=1, le=50)] = None
    filters: Filters = None


class StreamOptions(BaseModel):
    """OpenAI's stream options."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, with our extras."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    seed: int | None = None
    user: Annotated[str, Field(max_length=256), SINGLE_LINE] | None = None
    store: bool = True  # keep the exchange as a conversation (OpenAI's own flag)
    # Our extras.
    knowledge_base_ids: Annotated[list[uuid.UUID] | None, Field(max_length=100)] = None
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    conversation_id: uuid.UUID | None = None

    @field_validator("messages")
    @classmethod
    def _bounded_in_all(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if sum(len(m.text) for m in value) > MAX_REQUEST_CHARS:
            raise ValueError(f"the messages' text is longer than {MAX_REQUEST_CHARS} "
                             "characters in all")
        return value

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters to pass upstream as given."""
        keys = ("temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class Citation(BaseModel):
    """A numbered passage the answer may cite as ``[index]``."""

    index: int
    chunk_id: uuid.UUID
    document_id: uuid.UUID
    kb_id: uuid.UUID
    filename: str
    page: int | None
    char_start: int
    char_end: int
    heading_path: list[str]
    score: float
    snippet: str
    # The passage reads like instructions aimed at an AI: the model was told to treat it
    # as quoted data (docs/chat.md).
    suspected_instructions: bool = False


class ConversationOut(BaseModel):
    """A conversation without its messages."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    end_user: str
    title: str
    created_at: datetime
    updated_at: datetime


class MessageOut(BaseModel):
    """One stored turn; assistant turns carry the citations they were given."""

    model_config = ConfigDict(from_attributes=True)

    role: str
    content: str
    citations: list[dict[str, Any]]
    request_id: str | None
    created_at: datetime


class ConversationDetail(ConversationOut):
    """A conversation with its messages, oldest first."""

    messages: list[MessageOut]


class ConversationPage(BaseModel):
    """One page of conversations."""

    data: list[ConversationOut]
    total: int
    limit: int
    offset: int
