"""The streamed answer: the generation server's chunks relayed to the client as
server-sent events (our id, model and creation time; each piece through the tenant's
content rules; usage passed on when asked for, counted when the engine sent none), the
first chunk carrying the citations, an upstream failure mid-stream ending in an error
event, and ``[DONE]`` after the turn is stored and the slots freed. Also the answers
to a request the content rules refused (whole, or as a stream), which generate nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from app.db.models import Tenant
from app.domain.chat.answer import DONE, Prepared, Usage, chunk, sse, usage_of
from app.domain.chat.content import CONTENT_FILTER, INPUT_REFUSAL, OUTPUT_REFUSAL
from app.domain.chat.settlement import Settlement
from app.errors import DomainError
from app.inference.dispatcher import DispatchedStream
from app.quotas.limiter import RateLimiter

log = logging.getLogger(__name__)


class Relay:
    """Writes the server-sent events of streamed answers and the refusals."""

    def __init__(self, settlement: Settlement, limiter: RateLimiter | None) -> None:
        self.settlement = settlement
        self.limiter = limiter

    async def stream(self, tenant: Tenant, p: Prepared,
                     upstream: DispatchedStream) -> AsyncIterator[bytes]:
        """Server-sent events: a first chunk with the citations, the upstream's chunks,
        then ``[DONE]``. An upstream failure mid-stream ends the stream with an error
        event (and ``[DONE]``) instead of cutting it. The turn is stored and the
        request's slots freed before ``[DONE]`` (so the conversation can be continued at
        once), its usage event written behind it;
        if the client goes away, this generator is cancelled (and, under anyio, so is
        every later await in it), but what was generated is still stored and metered, in
        a task of its own."""
        s, settlement = p.state, self.settlement
        first = chunk(p, {"role": "assistant", "content": ""})
        first["citations"] = p.citation_dicts()
        first["conversation_id"] = p.conversation()
        try:
            yield sse(first)
            try:
                async for piece in self._relay(tenant, p, upstream):
                    yield piece
                s.status = "content_blocked" if p.filter.hit else "ok"
            except DomainError as exc:
                s.status = exc.code
                log.warning("stream %s ended by an upstream failure: %s", p.request_id, exc)
                yield sse({"error": {"message": exc.detail, "type": exc.code,
                                     "code": exc.code}})
            await settlement.record(tenant, p, "".join(s.shown))
            s.recorded = True
            # Slots free before [DONE]; shielded: a client leaving now must not stop it
            # halfway (finish marks itself done first, so it would not run again).
            await asyncio.shield(settlement.finish_behind(tenant, p))
        finally:
            settlement.behind(settlement.wrap_up(tenant, p))
        yield DONE

    async def _relay(self, tenant: Tenant, p: Prepared,
                     upstream: DispatchedStream) -> AsyncIterator[bytes]:
        """The upstream's chunks, rewritten with our id and model, their text passed
        through the tenant's content rules; usage collected. A rule hit ends the answer
        with a refusal notice (and stops generating)."""
        s = p.state
        renewed = time.perf_counter()
        async for event in upstream.events():
            piece = event.chunk
            if piece is None:
                break
            if s.ttft_s is None:
                s.ttft_s = time.perf_counter() - p.started
            if p.ticket is not None and self.limiter is not None \
                    and time.perf_counter() - renewed > self.limiter.lease_ttl_s / 3:
                renewed = time.perf_counter()  # a long stream keeps its lease
                await self.limiter.renew(p.ticket)
            piece["id"], piece["model"], piece["created"] = p.request_id, p.model, p.created
            if not await self._filter_chunk(p, piece):
                self.settlement.note_hit(tenant, p, "output")
                notice = f"\n\n{OUTPUT_REFUSAL}" if "".join(s.shown).strip() else OUTPUT_REFUSAL
                stop = chunk(p, {"content": notice})
                stop["choices"][0]["finish_reason"] = s.finish_reason = CONTENT_FILTER
                s.shown.append(notice)
                yield sse(stop)
                await upstream.close()  # generating the rest is wasted work
                break
            if piece.get("usage") is not None:
                s.usage = usage_of(piece["usage"])
            if not piece.get("choices") and piece.get("usage") is not None:
                if p.include_usage:
                    yield sse(piece)
                continue
            if not p.include_usage:
                piece.pop("usage", None)
            yield sse(piece)
        if s.usage is None:  # the server reported none: count with its tokenizer
            s.usage = await self.settlement.count_usage(p, "".join(s.answer))
            if p.include_usage:
                usage_chunk = chunk(p, {})
                usage_chunk["choices"], usage_chunk["usage"] = [], s.usage.as_dict()
                yield sse(usage_chunk)

    @staticmethod
    async def _filter_chunk(p: Prepared, piece: dict[str, Any]) -> bool:
        """Pass the chunk's text through the content rules (in place); False when a rule
        is hit (the chunk must not be sent)."""
        s = p.state
        for choice in piece.get("choices") or []:
            delta = choice.get("delta") or {}
            text = str(delta.get("content") or "")
            s.answer.append(text)
            s.finish_reason = choice.get("finish_reason") or s.finish_reason
            shown = await p.filter.piece(text)
            if choice.get("finish_reason"):
                shown += await p.filter.end()
            if p.filter.hit is not None:
                return False
            if shown != text:
                delta["content"] = shown
                choice["delta"] = delta
            s.shown.append(shown)
        return True

    def refusal(self, tenant: Tenant, p: Prepared) -> dict[str, Any]:
        """The whole answer to a refused request (its hit recorded, nothing generated)."""
        s = p.state
        self.settlement.note_hit(tenant, p, "input")
        s.usage, s.shown = Usage(0, 0), [INPUT_REFUSAL]
        s.response = {
            "id": p.request_id, "object": "chat.completion", "created": p.created,
            "model": p.model, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": INPUT_REFUSAL},
                "logprobs": None, "finish_reason": CONTENT_FILTER}],
            "usage": s.usage.as_dict(), "citations": [], "conversation_id": None}
        self.settlement.finish_behind(tenant, p)
        return s.response

    async def refusal_stream(self, tenant: Tenant, p: Prepared) -> AsyncIterator[bytes]:
        """The same refusal as server-sent events."""
        whole = self.refusal(tenant, p)
        yield sse({**chunk(p, {"role": "assistant", "content": ""}),
                   "citations": [], "conversation_id": None})
        done = chunk(p, {"content": INPUT_REFUSAL})
        done["choices"][0]["finish_reason"] = CONTENT_FILTER
        yield sse(done)
        if p.include_usage:
            yield sse({**chunk(p, {}), "choices": [], "usage": whole["usage"]})
        yield DONE
