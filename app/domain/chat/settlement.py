"""How a chat request ends, once, however it ended (answered, refused, failed, or left
by its client): its admission settled (actual tokens for the reservation, its slots
freed, its request id kept for replays or freed for a retry), its usage counted when the
engine reported none, its usage event and metrics written, and what it leaves behind
(the stored conversation turn, a content-rule hit); what can wait runs behind the
answer, on the app's :class:`~app.domain.chat.background.BackgroundWrites`, which
shutdown waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from app.db.models import ContentRuleHit, Tenant
from app.domain.chat.answer import Prepared, Usage, fresh_metering_id
from app.domain.chat.background import BackgroundWrites
from app.domain.chat.conversations import ConversationService
from app.domain.chat.replay import StoredAnswer
from app.domain.content_rules.service import ContentRulesService
from app.errors import DomainError, NoCapacityError, QueueTimeoutError
from app.inference.dispatcher import Dispatcher
from app.observability.metrics import ServiceMetrics
from app.quotas.limiter import RateLimiter
from app.quotas.usage import CHAT, UsageService
from app.quotas.usage_writer import UsageEventQuarantinedError, UsageRow

log = logging.getLogger(__name__)
_DISPATCH_REFUSALS = frozenset({QueueTimeoutError.code, NoCapacityError.code})


class Settlement:
    """Ends chat requests: settles, counts, meters, stores and records behind them."""

    def __init__(self, dispatcher: Dispatcher, limiter: RateLimiter | None,
                 usage: UsageService, conversations: ConversationService,
                 background: BackgroundWrites, metrics: ServiceMetrics | None = None,
                 content: ContentRulesService | None = None) -> None:
        self.dispatcher = dispatcher
        self.limiter = limiter
        self.usage = usage
        self.conversations = conversations
        self.background = background
        self.metrics = metrics
        self.content = content

    def behind(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` behind the answer (its own task; the client cannot cancel it)."""
        return self.background.start(coro)

    def finish_behind(self, tenant: Tenant, p: Prepared) -> asyncio.Task[None]:
        """:meth:`finish` as a task of its own."""
        return self.behind(self.finish(tenant, p))

    async def finish(self, tenant: Tenant, p: Prepared) -> None:
        """End the request once, however it ended: settle its reservation and free its
        concurrency slots now (the client may send its next request at once), then
        write its usage event behind it. Never raises."""
        s = p.state
        if s.finished:
            return
        s.finished = True
        try:
            if s.usage is None and s.where is not None:  # sent, but no usage came back
                s.usage = await self.count_usage(p, "".join(s.answer))
            usage = s.usage or Usage(0, 0)
            if p.ticket is not None and self.limiter is not None:
                kept = self._replayable(p) if p.ticket.claimed else None
                if kept is None and p.ticket.claimed:  # its id is free for a retry, which
                    s.metering_id = fresh_metering_id(s.metering_id)  # meters under it
                await self.limiter.settle(p.ticket, usage.total_tokens, kept)
            self.behind(self._meter(tenant, p, usage))
        except Exception:
            log.exception("settling %s failed", s.metering_id)

    async def wrap_up(self, tenant: Tenant, p: Prepared) -> None:
        """After a stream, however it ended: its turn stored (once), then finished."""
        if not p.state.recorded:
            p.state.recorded = True
            await self.record(tenant, p, "".join(p.state.shown))
        await self.finish(tenant, p)

    @staticmethod
    def _replayable(p: Prepared) -> str | None:
        """What a replay of the request's id gets: its answer (as far as it went), or
        None if nothing was generated (it never reached a generation server)."""
        s = p.state
        if s.response is None and s.where is None and p.refused is None:
            return None
        # A client that left mid-answer got part of it: a replay says it ended early.
        failed = s.status not in ("ok", "content_blocked")
        return StoredAnswer(
            id=p.request_id, created=p.created, model=p.model, content="".join(s.shown),
            finish_reason=s.finish_reason, usage=s.usage.as_dict() if s.usage else None,
            citations=p.citation_dicts(), conversation_id=p.conversation(),
            error=s.status if failed else None, response=s.response).dumps()

    async def _meter(self, tenant: Tenant, p: Prepared, usage: Usage) -> None:
        """The request's usage event and metrics. Its id was metered before only when
        its idempotency record was gone (expired, or Redis lost it): the event is then
        stored under a fresh id, never dropped, and the budget keeps its tokens."""
        s = p.state
        try:
            gpu_seconds = s.where.gpu_seconds if s.where else None
            cost = self.dispatcher.cost(s.where, p.model, prompt=usage.prompt_tokens,
                                        completion=usage.completion_tokens,
                                        cached=usage.cached_tokens)
            duration_s = time.perf_counter() - p.started
            event = UsageRow(
                tenant_id=tenant.id, request_id=s.metering_id, kind=CHAT,
                end_user=p.end_user, model=p.model,
                pool=s.where.pool if s.where else None,
                replica=s.where.replica if s.where else None,
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                ttft_ms=s.ttft_s * 1000 if s.ttft_s is not None else None,
                latency_ms=duration_s * 1000, status=s.status, cost_usd=cost,
                gpu_seconds=gpu_seconds)
            self._observe(tenant, p, usage, duration_s, gpu_seconds, float(cost))
            if not await self.usage.record(event):
                event.request_id = fresh_metering_id(s.metering_id)
                log.warning("request id %s was metered before; its usage is stored as %s",
                            s.metering_id, event.request_id)
                await self.usage.record(event)
        except UsageEventQuarantinedError:
            pass  # the writer kept it in the quarantine, and logged and counted it
        except Exception:
            log.exception("could not write the usage event of %s", s.metering_id)

    def _observe(self, tenant: Tenant, p: Prepared, usage: Usage, duration_s: float,
                 gpu_seconds: float | None, cost: float) -> None:
        if self.metrics is None:
            return
        status = p.state.status
        self.metrics.observe_chat(
            tenant.slug, p.model, status, prompt=usage.prompt_tokens,
            completion=usage.completion_tokens, cached=usage.cached_tokens,
            duration_s=duration_s, ttft_s=p.state.ttft_s, gpu_seconds=gpu_seconds,
            cost_usd=cost)
        if status in _DISPATCH_REFUSALS:
            self.metrics.rejected(tenant.slug, status)

    async def metered_tokens(self, tenant_id: uuid.UUID, period: str) -> int:
        """The period's metered tokens, to rebuild a budget counter Redis lost: first
        this process's usage events still being written (requests already settled whose
        events are not in PostgreSQL yet would otherwise be missed)."""
        await self.background.done(timeout_s=10.0)
        return await self.usage.tokens_in_period(tenant_id, period)

    async def count_usage(self, p: Prepared, answer: str) -> Usage:
        """Usage from the server's tokenizer, for a server that reported none. Where it
        cannot count (no capacity, the server gone), what it could not count is billed
        at its upper bound (a token per byte): generated text is never billed as 0."""
        prompt = p.prompt_tokens  # counted exactly while fitting the window, if it was
        completion = len(answer.encode())
        try:
            if prompt is None:
                prompt = await self.dispatcher.count_prompt_tokens(
                    p.route, p.model, p.body["messages"], cost=p.prompt_tokens_bound)
            completion = await self.dispatcher.count_text_tokens(
                p.route, p.model, answer, cost=len(answer)) if answer else 0
        except DomainError as exc:
            log.warning("could not count the tokens of %s (billed at their bound): %s",
                        p.request_id, exc)
        return Usage(p.prompt_tokens_bound if prompt is None else prompt, completion,
                     counted=True)

    async def record(self, tenant: Tenant, p: Prepared, answer: str) -> None:
        """Store the turn in its conversation (if it has one). Never raises."""
        conversation_id = p.state.conversation_id
        if conversation_id is None:
            return
        try:
            await self.conversations.record(tenant.id, conversation_id, p.turns, answer,
                                            p.citation_dicts(), p.request_id)
        except Exception:  # the answer was delivered; losing its copy must not fail it
            log.exception("could not store the turn of conversation %s", conversation_id)

    def note_hit(self, tenant: Tenant, p: Prepared, direction: str) -> None:
        """Record which rule stopped the request or answer (behind the answer)."""
        if self.content is None or p.filter.hit is None:
            return
        if self.metrics is not None:
            self.metrics.rejected(tenant.slug, "content_blocked")
        self.behind(self.content.record_hit(ContentRuleHit(
            tenant_id=tenant.id, request_id=p.state.metering_id, end_user=p.end_user,
            direction=direction, rule=p.filter.hit)))
