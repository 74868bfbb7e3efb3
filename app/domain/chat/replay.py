"""Idempotent chat requests: what identifies a request body, and the stored answer that
a replay of its ``X-Request-Id`` gets instead of a second generation.
The limiter claims the id in Redis with the admission and keeps the answer there once
the request settles (app/quotas/limiter.py); this module only says what is stored and
how a replay renders it: the same JSON for a whole answer, the same events for a stream
(the answer in one content chunk, then the finish, the usage if asked, ``[DONE]``), with
an ``Idempotent-Replayed`` header.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from app.domain.chat.answer import DONE, STREAM_HEADERS, ChatReply, sse
from app.domain.chat.schemas import ChatCompletionRequest
from app.errors import UpstreamError

REPLAYED = {"Idempotent-Replayed": "true"}


def request_hash(req: ChatCompletionRequest, scope: str) -> str:
    """The validated request in canonical JSON, with who asks (``scope``), hashed: two
    requests with the same id are the same request only if these are equal."""
    canonical = json.dumps([scope, req.model_dump(mode="json")], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class StoredAnswer:
    """A request's answer as far as it went. ``response``: the exact JSON of a whole
    answer; ``error``: the code a stream ended with, if an upstream failure ended it."""

    id: str
    created: int
    model: str
    content: str
    finish_reason: str | None
    usage: dict[str, int] | None
    citations: list[dict[str, Any]]
    conversation_id: str | None
    error: str | None = None
    response: dict[str, Any] | None = None

    def dumps(self) -> str:
        """As stored in Redis."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str) -> StoredAnswer:
        """Read back what :meth:`dumps` wrote."""
        return cls(**json.loads(raw))

    def as_json(self) -> dict[str, Any]:
        """The whole answer (a chat completion), as the first request got it."""
        if self.response is not None:
            return self.response
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": self.content},
                    "logprobs": None, "finish_reason": self.finish_reason}],
                "usage": self.usage, "citations": self.citations,
                "conversation_id": self.conversation_id}

    async def as_events(self, include_usage: bool) -> AsyncIterator[bytes]:
        """The answer as server-sent events, in the format of a live stream."""
        first = self._chunk({"role": "assistant", "content": ""})
        yield sse({**first, "citations": self.citations,
                   "conversation_id": self.conversation_id})
        whole = self.as_json()
        choice = (whole.get("choices") or [{}])[0]
        content = str((choice.get("message") or {}).get("content") or "")
        done = self._chunk({"content": content})
        done["choices"][0]["finish_reason"] = choice.get("finish_reason")
        yield sse(done)
        if self.error is not None:
            yield sse({"error": {"message": f"the answer ended early ({self.error})",
                                 "type": self.error, "code": self.error}})
        elif include_usage and whole.get("usage") is not None:
            yield sse({**self._chunk({}), "choices": [], "usage": whole["usage"]})
        yield DONE

    def _chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": None}]}



def replayed(stored: StoredAnswer, req: ChatCompletionRequest) -> ChatReply:
    """The first request's answer again (its X-Request-Id and body seen before)."""
    if stored.error is not None and stored.response is None and not req.stream:
        # Generated, then failed: the first request was answered with this error too.
        raise UpstreamError(f"the first request with this X-Request-Id failed "
                            f"({stored.error}); send a new id to ask again")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatReply(events=stored.as_events(include_usage),
                         headers={**STREAM_HEADERS, **REPLAYED})
    return ChatReply(json=stored.as_json(), headers=REPLAYED)
