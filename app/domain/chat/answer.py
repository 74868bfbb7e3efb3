"""One chat request on its way to an answer, as data: what was planned before admission
(:class:`Plan`), what is sent upstream (:class:`Prepared`, fixed once prepared), how the
answer is going (:class:`AnswerState`, the only mutable part, written by the whole
answer in service.py, the relay and the settlement), its token usage (:class:`Usage`),
what the HTTP layer sends back (:class:`ChatReply`), and the small pure helpers of
OpenAI's wire format (chunks, server-sent events, citations, usage); keeping the fixed
request apart from its state shows which step changes what.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.db.models import SystemMessagePolicy
from app.domain.chat.content import AnswerFilter
from app.domain.chat.schemas import Citation
from app.domain.search.schemas import RetrievedChunk
from app.ids import new_id
from app.inference.dispatcher import Dispatched, TenantRoute
from app.quotas.limiter import Claim, Ticket

DONE = b"data: [DONE]\n\n"
# What a server-sent event stream is answered with (no caching, no proxy buffering).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Usage:
    """Token counts of one request: the engine's own, or counted after the fact."""

    prompt_tokens: int
    completion_tokens: int
    counted: bool = False  # True when the server reported none and we counted
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """OpenAI's usage object."""
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Plan:
    """What a request asks for, checked without any work (no I/O but the model's cached
    context window): enough to admit it before retrieval and token counting."""

    route: TenantRoute
    policy: SystemMessagePolicy
    caller_system: list[str]
    turns: list[dict[str, str]]
    max_tokens: int
    window: int
    cost: int  # admission's estimate of the request's tokens (prompt bound + max_tokens)
    request_id: str | None  # the client's X-Request-Id
    claim: Claim | None  # that id with the request's hash, to claim at admission


@dataclass
class AnswerState:
    """How one request's answer is going: what was generated and shown, where, its
    usage, and how it ended (written by the relay, the whole answer and settlement)."""

    metering_id: str  # the client's X-Request-Id, else the response id
    conversation_id: uuid.UUID | None = None
    answer: list[str] = field(default_factory=list)  # generated (what is metered)
    shown: list[str] = field(default_factory=list)  # what the user got (what is stored)
    usage: Usage | None = None
    where: Dispatched | None = None
    finish_reason: str | None = None
    response: dict[str, Any] | None = None  # the whole answer sent (not streamed)
    ttft_s: float | None = None
    status: str = "client_closed"  # until the request ends otherwise
    finished: bool = False
    recorded: bool = False


@dataclass(frozen=True)
class Prepared:
    """A request ready to send upstream, and what to do with the answer (fixed once
    prepared; how it goes is in ``state``)."""

    request_id: str  # the response id (chatcmpl-...)
    created: int
    model: str
    route: TenantRoute
    body: dict[str, Any]
    citations: list[Citation]
    turns: list[dict[str, str]]
    include_usage: bool
    prompt_tokens_bound: int
    state: AnswerState
    filter: AnswerFilter = field(default_factory=AnswerFilter)
    refused: str | None = None  # the content rule the user's message broke
    end_user: str = ""
    store: bool = True
    ticket: Ticket | None = None
    prompt_tokens: int | None = None  # the prompt's exact count, when /tokenize gave it
    started: float = field(default_factory=time.perf_counter)

    @property
    def cost(self) -> int:
        """Estimated tokens of the request (its fair-queue cost)."""
        return self.prompt_tokens_bound + int(self.body.get("max_tokens") or 0)

    def citation_dicts(self) -> list[dict[str, Any]]:
        """Citations as JSON-ready dicts."""
        return [c.model_dump(mode="json") for c in self.citations]

    def conversation(self) -> str | None:
        """The conversation id as the response names it."""
        conversation_id = self.state.conversation_id
        return str(conversation_id) if conversation_id else None


@dataclass(frozen=True)
class ChatReply:
    """What the HTTP layer sends: a whole JSON answer, or a stream of server-sent
    events, with the headers that go with it."""

    json: dict[str, Any] | None = None
    events: AsyncIterator[bytes] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def response_id() -> str:
    """A fresh response id, as OpenAI's look."""
    return f"chatcmpl-{new_id()}"


def fresh_metering_id(request_id: str) -> str:
    """A usage event id of its own for a request whose client id is metered under
    another event ('/' never occurs in a client's id; 100 characters at most)."""
    return f"{request_id[:67]}/{new_id()}"


def chunk(p: Prepared, delta: dict[str, Any]) -> dict[str, Any]:
    """A stream chunk of this answer carrying ``delta``."""
    return {"id": p.request_id, "object": "chat.completion.chunk", "created": p.created,
            "model": p.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": None}]}


def citation(index: int, chunk: RetrievedChunk, snippet_chars: int) -> Citation:
    """The citation of a retrieved passage, numbered as the prompt numbers it."""
    return Citation(index=index, chunk_id=chunk.chunk_id, document_id=chunk.document_id,
                    kb_id=chunk.kb_id, filename=chunk.filename, page=chunk.page,
                    char_start=chunk.char_start, char_end=chunk.char_end,
                    heading_path=chunk.heading_path, score=chunk.score,
                    snippet=chunk.text[:snippet_chars],
                    suspected_instructions=chunk.suspected_instructions)


def usage_of(raw: Any) -> Usage | None:
    """The engine's usage object, if it sent a usable one."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(prompt, completion, cached_tokens=cached if isinstance(cached, int) else 0)


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
