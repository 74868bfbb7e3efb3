"""The chat path: tenant rules -> retrieval -> prompt within the context window ->
generation -> citations and the stored conversation.

Generation goes through the dispatcher (pools, replicas, fair queues, failover); usage is
the engine's own, or counted with its ``/tokenize`` when it reports none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from app.db.models import ContentRuleHit, SystemMessagePolicy, Tenant
from app.domain.chat.content import CONTENT_FILTER, INPUT_REFUSAL, OUTPUT_REFUSAL, AnswerFilter
from app.domain.chat.conversations import ConversationService
from app.domain.chat.prompt import (
    TEMPLATE_TOKENS_PER_MESSAGE,
    PromptParts,
    build_messages,
    caller_instructions,
    defuse,
    prompt_estimate,
    token_upper_bound,
)
from app.domain.chat.replay import StoredAnswer, request_hash
from app.domain.chat.schemas import ChatCompletionRequest, Citation
from app.domain.content_rules.service import ContentRulesService
from app.domain.search.schemas import RetrievedChunk
from app.domain.search.service import SearchService
from app.domain.tenants.service import TenantService
from app.errors import (
    BadRequestError,
    ContextLengthError,
    DomainError,
    NoCapacityError,
    NotFoundError,
    PermissionDeniedError,
    QueueTimeoutError,
    RateLimitedError,
    ServiceUnavailableError,
)
from app.ids import new_id
from app.inference.dispatcher import (
    Disconnected,
    Dispatched,
    DispatchedStream,
    Dispatcher,
    TenantRoute,
)
from app.observability.metrics import ServiceMetrics
from app.quotas.limiter import Claim, LeaseKeeper, Limits, RateLimiter, Ticket
from app.quotas.policy import limits_for, output_cap
from app.quotas.usage import CHAT, UsageService
from app.quotas.usage_writer import UsageEventQuarantinedError, UsageRow
from app.settings import ChatSettings, LlmSettings

log = logging.getLogger(__name__)
SHORT_QUESTION_WORDS = 6
# Trimming scales one exact count by bytes: this much spare for text denser than the
# prompt's average (vLLM refuses a prompt over the window; it never truncates one).
FIT_HEADROOM = 0.1


def allowed_models(tenant: Tenant, served: list[str]) -> list[str]:
    """Models this tenant may use: its own list, else every model the platform serves."""
    return [m for m in tenant.allowed_models if m in served] if tenant.allowed_models else served


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
class Prepared:
    """A request ready to send upstream, and what to do with the answer."""

    request_id: str
    created: int
    model: str
    route: TenantRoute
    body: dict[str, Any]
    citations: list[Citation]
    conversation_id: uuid.UUID | None
    turns: list[dict[str, str]]
    include_usage: bool
    prompt_tokens_bound: int
    answer: list[str] = field(default_factory=list)  # generated (what is metered)
    shown: list[str] = field(default_factory=list)  # what the user got (what is stored)
    filter: AnswerFilter = field(default_factory=AnswerFilter)
    refused: str | None = None  # the content rule the user's message broke
    usage: Usage | None = None
    where: Dispatched | None = None
    finish_reason: str | None = None
    end_user: str = ""
    metering_id: str = ""  # the client's X-Request-Id, else the response id
    store: bool = True
    ticket: Ticket | None = None
    prompt_tokens: int | None = None  # the prompt's exact count, when /tokenize gave it
    response: dict[str, Any] | None = None  # the whole answer sent (not streamed)
    started: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None
    status: str = "client_closed"  # until the request ends otherwise
    finished: bool = False
    recorded: bool = False

    @property
    def cost(self) -> int:
        """Estimated tokens of the request (its fair-queue cost)."""
        return self.prompt_tokens_bound + int(self.body.get("max_tokens") or 0)

    def citation_dicts(self) -> list[dict[str, Any]]:
        """Citations as JSON-ready dicts."""
        return [c.model_dump(mode="json") for c in self.citations]


class ChatService:
    """Answers a chat request grounded in the tenant's documents."""

    def __init__(self, search: SearchService, conversations: ConversationService,
                 dispatcher: Dispatcher, llm: LlmSettings, chat: ChatSettings,
                 usage: UsageService, limiter: RateLimiter | None,
                 metrics: ServiceMetrics | None = None,
                 content: ContentRulesService | None = None,
                 tenants: TenantService | None = None) -> None:
        self.search = search
        self.conversations = conversations
        self.dispatcher = dispatcher
        self.llm = llm
        self.chat = chat
        self.usage = usage
        self.limiter = limiter
        self.metrics = metrics
        self.content = content
        self.tenants = tenants or TenantService(conversations.db)

    async def plan(self, tenant: Tenant, req: ChatCompletionRequest,
                   request_id: str | None = None, scope: str = "") -> Plan:
        """Check what the request asks for (model, messages, room in the context window)
        and estimate its tokens, without retrieval or token counting. ``request_id`` (the
        client's ``X-Request-Id``) makes the request idempotent, for its body and
        ``scope`` (who asks: an embed token's end user)."""
        if req.model not in allowed_models(tenant, self.dispatcher.models):
            if not self.dispatcher.serves(req.model):
                raise NotFoundError(f"model {req.model!r} does not exist; see GET /v1/models")
            raise PermissionDeniedError(f"this tenant may not use model {req.model!r}",
                                        model=req.model)
        route = TenantRoute.of(tenant)
        self.dispatcher.pools_for(route, req.model)  # 503 now if no pool may serve it
        policy = SystemMessagePolicy(tenant.system_message_policy)
        caller_system = caller_instructions(req.messages, policy)
        turns = [{"role": m.role, "content": m.text} for m in req.messages
                 if m.role not in ("system", "developer")]
        if not turns or turns[-1]["role"] != "user":
            raise BadRequestError("the last message must be the user's")
        max_tokens = self._max_tokens(tenant, req)
        window = await self.dispatcher.context_window(route, req.model)  # asked once
        if window - max_tokens <= 0:
            raise ContextLengthError(f"max_tokens {max_tokens} leaves no room for a prompt "
                                     f"in the model's {window}-token context window")
        passages = (req.retrieval.top_k or self.chat.top_k) if req.retrieval.enabled else 0
        prompt = min(window - max_tokens, prompt_estimate(
            [tenant.system_prompt, *caller_system, *(t["content"] for t in turns)], passages))
        claim = Claim(request_id, request_hash(req, scope)) if request_id else None
        return Plan(route=route, policy=policy, caller_system=caller_system, turns=turns,
                    max_tokens=max_tokens, window=window, cost=prompt + max_tokens,
                    request_id=request_id, claim=claim)

    async def prepare(self, tenant: Tenant, req: ChatCompletionRequest, plan: Plan,
                      ticket: Ticket | None) -> Prepared:
        """After admission: the tenant's content rules, history, retrieval, and the
        prompt within the context window. A failure here settles the admission (nothing
        was generated, so a claimed request id is freed for a retry)."""
        try:
            p = await self._prepare(tenant, req, plan)
        except BaseException:
            if ticket is not None and self.limiter is not None:
                await asyncio.shield(self.limiter.settle(ticket, 0))
            raise
        p.ticket = ticket
        return p

    async def _prepare(self, tenant: Tenant, req: ChatCompletionRequest,
                       plan: Plan) -> Prepared:
        end_user = req.user or ""
        turns = plan.turns
        answer_filter = AnswerFilter.of(tenant, self.chat)
        sent = "\n".join([*plan.caller_system, *(t["content"] for t in turns)])
        if await answer_filter.check_input(sent) is not None:
            return self._refused(req, plan.route, turns, answer_filter, end_user,
                                 plan.request_id)
        history: list[dict[str, str]] = []
        conversation_id = req.conversation_id
        if conversation_id is not None:
            history = await self.conversations.history(
                tenant.id, end_user, conversation_id, self.chat.max_history_messages)
        passages = await self._retrieve(tenant, req, history, turns)
        # Earlier turns sent with the request are history too: trimmed first if too long.
        parts = PromptParts(tenant_prompt=tenant.system_prompt, policy=plan.policy,
                            caller_system=plan.caller_system, passages=passages,
                            history=[*history, *turns[:-1]], turns=turns[-1:])
        messages, bound, kept, exact = await self._fit(plan, req.model, parts)
        citations = await answer_filter.citations(
            [_citation(i, p, self.chat.snippet_chars)
             for i, p in enumerate((passages or [])[:kept], start=1)])
        body: dict[str, Any] = {
            "model": req.model, "messages": messages, "max_tokens": plan.max_tokens,
            "stream": req.stream, **req.sampling(),
        }  # the dispatcher adds the tenant's cache_salt (and priority where the pool uses it)
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        response_id = f"chatcmpl-{new_id()}"
        return Prepared(
            request_id=response_id, created=int(time.time()),
            model=req.model, route=plan.route, body=body, citations=citations,
            conversation_id=conversation_id if req.store else None, turns=turns,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            prompt_tokens_bound=bound, end_user=end_user,
            metering_id=plan.request_id or response_id, store=req.store,
            filter=answer_filter, prompt_tokens=bound if exact else None,
        )

    def _refused(self, req: ChatCompletionRequest, route: TenantRoute,
                 turns: list[dict[str, str]], answer_filter: AnswerFilter, end_user: str,
                 request_id: str | None) -> Prepared:
        """A request whose message breaks the tenant's content rules: answered with a
        refusal, without retrieval or generation."""
        response_id = f"chatcmpl-{new_id()}"
        return Prepared(
            request_id=response_id, created=int(time.time()), model=req.model, route=route,
            body={}, citations=[], conversation_id=None, turns=turns,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            prompt_tokens_bound=0, end_user=end_user,
            metering_id=request_id or response_id, store=False, filter=answer_filter,
            refused=answer_filter.hit, status="content_blocked", finish_reason=CONTENT_FILTER)

    def refusal(self, tenant: Tenant, p: Prepared) -> dict[str, Any]:
        """The whole answer to a refused request (its hit recorded, nothing generated)."""
        self._note_hit(tenant, p, "input")
        p.usage, p.shown = Usage(0, 0), [INPUT_REFUSAL]
        p.response = {
            "id": p.request_id, "object": "chat.completion", "created": p.created,
            "model": p.model, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": INPUT_REFUSAL},
                "logprobs": None, "finish_reason": CONTENT_FILTER}],
            "usage": p.usage.as_dict(), "citations": [], "conversation_id": None}
        _detach(self.finish(tenant, p))
        return p.response

    async def refusal_stream(self, tenant: Tenant, p: Prepared) -> AsyncIterator[bytes]:
        """The same refusal as server-sent events."""
        whole = self.refusal(tenant, p)
        yield _sse({**self._chunk(p, {"role": "assistant", "content": ""}),
                    "citations": [], "conversation_id": None})
        done = self._chunk(p, {"content": INPUT_REFUSAL})
        done["choices"][0]["finish_reason"] = CONTENT_FILTER
        yield _sse(done)
        if p.include_usage:
            yield _sse({**self._chunk(p, {}), "choices": [], "usage": whole["usage"]})
        yield b"data: [DONE]\n\n"

    def _note_hit(self, tenant: Tenant, p: Prepared, direction: str) -> None:
        """Record which rule stopped the request or answer (behind the answer)."""
        if self.content is None or p.filter.hit is None:
            return
        if self.metrics is not None:
            self.metrics.rejected(tenant.slug, "content_blocked")
        _detach(self.content.record_hit(ContentRuleHit(
            tenant_id=tenant.id, request_id=p.metering_id, end_user=p.end_user,
            direction=direction, rule=p.filter.hit)))

    async def admit(self, tenant: Tenant, req: ChatCompletionRequest,
                    plan: Plan) -> Ticket | None:
        """Rate limits, concurrency and the token budget, before any work (one Redis
        round trip; 429 if refused). A client request id is looked up in the same
        script: its replay gets the stored result (``Ticket.replay``), another body or
        a first request still running 409. None: nothing to admit (no limits, no id)."""
        limits = limits_for(tenant)
        if self.limiter is None or (limits == Limits() and plan.claim is None):
            return None
        try:
            return await self.limiter.admit(
                tenant.id, req.user or "", limits, plan.cost,
                lambda period: self._metered_tokens(tenant.id, period), plan.claim)
        except (RateLimitedError, ServiceUnavailableError) as exc:
            if self.metrics is not None:
                self.metrics.rejected(tenant.slug, exc.code)
            raise

    async def start_conversation(self, tenant: Tenant, p: Prepared) -> None:
        """Start the conversation if this is a new one (a refused request leaves none)."""
        if p.conversation_id is None and p.store:
            try:
                p.conversation_id = await self.conversations.start(
                    tenant.id, p.end_user, p.turns[-1]["content"])
            except BaseException:
                p.status = "error"
                await asyncio.shield(_detach(self.finish(tenant, p)))
                raise

    async def complete(self, tenant: Tenant, p: Prepared,
                       disconnected: Disconnected | None = None) -> dict[str, Any]:
        """A non-streaming answer, in OpenAI's format plus citations; metered however
        it ends."""
        try:
            response, p.where = await self._generate(p, disconnected)
            response["id"], response["model"] = p.request_id, p.model
            response["created"] = p.created
            response["citations"] = p.citation_dicts()
            response["conversation_id"] = str(p.conversation_id) if p.conversation_id else None
            choices = response.get("choices") or [{}]
            answer = str((choices[0].get("message") or {}).get("content") or "")
            p.finish_reason = choices[0].get("finish_reason")
            shown, stopped = await p.filter.whole(answer)
            if shown != answer and choices[0].get("message") is not None:
                choices[0]["message"]["content"] = shown
            if stopped:
                choices[0]["finish_reason"] = p.finish_reason = CONTENT_FILTER
                self._note_hit(tenant, p, "output")
            p.usage = _usage(response.get("usage"))
            if p.usage is None:
                p.usage = await self._count_usage(p, answer)
                response["usage"] = p.usage.as_dict()
            p.status = "content_blocked" if stopped else "ok"
            p.response, p.shown = response, [shown]  # what a replay of its id gets
        except DomainError as exc:
            p.status = exc.code
            raise
        finally:
            # Settled behind the answer, its usage event written after that. The
            # limiter knows: the tenant's next request, if refused meanwhile, waits for
            # the settlement and asks again (a client's next request never finds its
            # finished one still holding a slot).
            settled = _detach(self.finish(tenant, p))
            if p.ticket is not None and self.limiter is not None:
                self.limiter.settling(p.ticket, settled)
        await self._record(tenant, p, shown)
        return response

    async def _generate(self, p: Prepared, disconnected: Disconnected | None,
                        ) -> tuple[dict[str, Any], Dispatched]:
        """The whole answer from the dispatcher, the request's leases (and claimed id)
        renewed while it takes longer than a third of their lifetime."""
        if p.ticket is None or self.limiter is None:
            return await self.dispatcher.complete(p.route, p.model, p.body, p.cost,
                                                  disconnected)
        keeper = LeaseKeeper(self.limiter, p.ticket)
        try:
            return await self.dispatcher.complete(p.route, p.model, p.body, p.cost,
                                                  disconnected)
        finally:
            keeper.stop()

    async def open_stream(self, tenant: Tenant, p: Prepared,
                          disconnected: Disconnected | None = None) -> DispatchedStream:
        """Start generating; an unreachable or failing upstream raises here, while the
        client can still get a proper error status."""
        try:
            stream = await self.dispatcher.open_stream(p.route, p.model, p.body, p.cost,
                                                       disconnected)
        except BaseException as exc:
            p.status = exc.code if isinstance(exc, DomainError) else "client_closed"
            await asyncio.shield(_detach(self.finish(tenant, p)))
            raise
        p.where = stream.where
        return stream

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
        first = self._chunk(p, {"role": "assistant", "content": ""})
        first["citations"] = p.citation_dicts()
        first["conversation_id"] = str(p.conversation_id) if p.conversation_id else None
        try:
            yield _sse(first)
            try:
                async for piece in self._relay(tenant, p, upstream):
                    yield piece
                p.status = "content_blocked" if p.filter.hit else "ok"
            except DomainError as exc:
                p.status = exc.code
                log.warning("stream %s ended by an upstream failure: %s", p.request_id, exc)
                yield _sse({"error": {"message": exc.detail, "type": exc.code,
                                      "code": exc.code}})
            await self._record(tenant, p, "".join(p.shown))
            p.recorded = True
            # Slots free before [DONE]; shielded: a client leaving now must not stop it
            # halfway (finish marks itself done first, so it would not run again).
            await asyncio.shield(_detach(self.finish(tenant, p)))
        finally:
            _detach(self._wrap_up(tenant, p))
        yield b"data: [DONE]\n\n"

    async def _relay(self, tenant: Tenant, p: Prepared,
                     upstream: DispatchedStream) -> AsyncIterator[bytes]:
        """The upstream's chunks, rewritten with our id and model, their text passed
        through the tenant's content rules; usage collected. A rule hit ends the answer
        with a refusal notice (and stops generating)."""
        renewed = time.perf_counter()
        async for event in upstream.events():
            chunk = event.chunk
            if chunk is None:
                break
            if p.ttft_s is None:
                p.ttft_s = time.perf_counter() - p.started
            if p.ticket is not None and self.limiter is not None \
                    and time.perf_counter() - renewed > self.limiter.lease_ttl_s / 3:
                renewed = time.perf_counter()  # a long stream keeps its lease
                await self.limiter.renew(p.ticket)
            chunk["id"], chunk["model"], chunk["created"] = p.request_id, p.model, p.created
            if not await self._filter_chunk(p, chunk):
                self._note_hit(tenant, p, "output")
                notice = f"\n\n{OUTPUT_REFUSAL}" if "".join(p.shown).strip() else OUTPUT_REFUSAL
                stop = self._chunk(p, {"content": notice})
                stop["choices"][0]["finish_reason"] = p.finish_reason = CONTENT_FILTER
                p.shown.append(notice)
                yield _sse(stop)
                await upstream.close()  # generating the rest is wasted work
                break
            if chunk.get("usage") is not None:
                p.usage = _usage(chunk["usage"])
            if not chunk.get("choices") and chunk.get("usage") is not None:
                if p.include_usage:
                    yield _sse(chunk)
                continue
            if not p.include_usage:
                chunk.pop("usage", None)
            yield _sse(chunk)
        if p.usage is None:  # the server reported none: count with its tokenizer
            p.usage = await self._count_usage(p, "".join(p.answer))
            if p.include_usage:
                usage_chunk = self._chunk(p, {})
                usage_chunk["choices"], usage_chunk["usage"] = [], p.usage.as_dict()
                yield _sse(usage_chunk)

    @staticmethod
    async def _filter_chunk(p: Prepared, chunk: dict[str, Any]) -> bool:
        """Pass the chunk's text through the content rules (in place); False when a rule
        is hit (the chunk must not be sent)."""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = str(delta.get("content") or "")
            p.answer.append(text)
            p.finish_reason = choice.get("finish_reason") or p.finish_reason
            shown = await p.filter.piece(text)
            if choice.get("finish_reason"):
                shown += await p.filter.end()
            if p.filter.hit is not None:
                return False
            if shown != text:
                delta["content"] = shown
                choice["delta"] = delta
            p.shown.append(shown)
        return True

    async def _wrap_up(self, tenant: Tenant, p: Prepared) -> None:
        if not p.recorded:
            p.recorded = True
            await self._record(tenant, p, "".join(p.shown))
        await self.finish(tenant, p)

    async def finish(self, tenant: Tenant, p: Prepared) -> None:
        """End the request once, however it ended: settle its reservation and free its
        concurrency slots now (the client may send its next request at once), then
        write its usage event behind it. Never raises."""
        if p.finished:
            return
        p.finished = True
        try:
            if p.usage is None and p.where is not None:  # sent, but no usage came back
                p.usage = await self._count_usage(p, "".join(p.answer))
            usage = p.usage or Usage(0, 0)
            if p.ticket is not None and self.limiter is not None:
                kept = self._replayable(p) if p.ticket.claimed else None
                if kept is None and p.ticket.claimed:  # its id is free for a retry, which
                    p.metering_id = _fresh_metering_id(p.metering_id)  # meters under it
                await self.limiter.settle(p.ticket, usage.total_tokens, kept)
            _detach(self._meter(tenant, p, usage))
        except Exception:
            log.exception("settling %s failed", p.metering_id)

    @staticmethod
    def _replayable(p: Prepared) -> str | None:
        """What a replay of the request's id gets: its answer (as far as it went), or
        None if nothing was generated (it never reached a generation server)."""
        if p.response is None and p.where is None and p.refused is None:
            return None
        # A client that left mid-answer got part of it: a replay says it ended early.
        failed = p.status not in ("ok", "content_blocked")
        return StoredAnswer(
            id=p.request_id, created=p.created, model=p.model, content="".join(p.shown),
            finish_reason=p.finish_reason, usage=p.usage.as_dict() if p.usage else None,
            citations=p.citation_dicts(),
            conversation_id=str(p.conversation_id) if p.conversation_id else None,
            error=p.status if failed else None, response=p.response).dumps()

    async def _meter(self, tenant: Tenant, p: Prepared, usage: Usage) -> None:
        """The request's usage event and metrics. Its id was metered before only when
        its idempotency record was gone (expired, or Redis lost it): the event is then
        stored under a fresh id, never dropped, and the budget keeps its tokens."""
        try:
            gpu_seconds = p.where.gpu_seconds if p.where else None
            cost = self.dispatcher.cost(p.where, p.model, prompt=usage.prompt_tokens,
                                        completion=usage.completion_tokens,
                                        cached=usage.cached_tokens)
            duration_s = time.perf_counter() - p.started
            event = UsageRow(
                tenant_id=tenant.id, request_id=p.metering_id, kind=CHAT,
                end_user=p.end_user, model=p.model,
                pool=p.where.pool if p.where else None,
                replica=p.where.replica if p.where else None,
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                ttft_ms=p.ttft_s * 1000 if p.ttft_s is not None else None,
                latency_ms=duration_s * 1000, status=p.status, cost_usd=cost,
                gpu_seconds=gpu_seconds)
            self._observe(tenant, p, usage, duration_s, gpu_seconds, float(cost))
            if not await self.usage.record(event):
                event.request_id = _fresh_metering_id(p.metering_id)
                log.warning("request id %s was metered before; its usage is stored as %s",
                            p.metering_id, event.request_id)
                await self.usage.record(event)
        except UsageEventQuarantinedError:
            pass  # the writer kept it in the quarantine, and logged and counted it
        except Exception:
            log.exception("could not write the usage event of %s", p.metering_id)

    def _observe(self, tenant: Tenant, p: Prepared, usage: Usage, duration_s: float,
                 gpu_seconds: float | None, cost: float) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_chat(
            tenant.slug, p.model, p.status, prompt=usage.prompt_tokens,
            completion=usage.completion_tokens, cached=usage.cached_tokens,
            duration_s=duration_s, ttft_s=p.ttft_s, gpu_seconds=gpu_seconds, cost_usd=cost)
        if p.status in _DISPATCH_REFUSALS:
            self.metrics.rejected(tenant.slug, p.status)

    async def _metered_tokens(self, tenant_id: uuid.UUID, period: str) -> int:
        """The period's metered tokens, to rebuild a budget counter Redis lost: first
        this process's usage events still being written (requests already settled whose
        events are not in PostgreSQL yet would otherwise be missed)."""
        await wrap_ups_done(timeout_s=10.0)
        return await self.usage.tokens_in_period(tenant_id, period)

    def _chunk(self, p: Prepared, delta: dict[str, Any]) -> dict[str, Any]:
        return {"id": p.request_id, "object": "chat.completion.chunk", "created": p.created,
                "model": p.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": None}]}

    async def _count_usage(self, p: Prepared, answer: str) -> Usage:
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

    async def _record(self, tenant: Tenant, p: Prepared, answer: str) -> None:
        if p.conversation_id is None:
            return
        try:
            await self.conversations.record(tenant.id, p.conversation_id, p.turns, answer,
                                            p.citation_dicts(), p.request_id)
        except Exception:  # the answer was delivered; losing its copy must not fail it
            log.exception("could not store the turn of conversation %s", p.conversation_id)

    async def _retrieve(
        self, tenant: Tenant, req: ChatCompletionRequest, history: list[dict[str, str]],
        turns: list[dict[str, str]],
    ) -> list[RetrievedChunk] | None:
        if not req.retrieval.enabled:
            return None
        question = turns[-1]["content"]
        if len(question.split()) < SHORT_QUESTION_WORDS:
            # A short follow-up ("and for contractors?") leans on the previous question.
            earlier = [t["content"] for t in [*history, *turns[:-1]] if t["role"] == "user"]
            if earlier:
                question = f"{earlier[-1]}\n{question}"
        return await self.search.search(
            tenant.id, question[:4000], req.knowledge_base_ids,
            req.retrieval.top_k or self.chat.top_k, req.retrieval.filters)

    def _max_tokens(self, tenant: Tenant, req: ChatCompletionRequest) -> int:
        asked = req.max_completion_tokens or req.max_tokens or self.llm.default_max_tokens
        cap = output_cap(tenant)
        return min(asked, cap) if cap is not None else asked

    async def _fit(self, plan: Plan, model: str, parts: PromptParts,
                   ) -> tuple[list[dict[str, str]], int, int, bool]:
        """The messages, trimmed to fit the context window with room for the answer:
        oldest history first, then the lowest-ranked passages. Returns them with the
        prompt's token count, how many passages they kept, and whether the count is
        exact. At most one ``/tokenize`` call (through a generation slot): when the whole
        prompt is over, what to drop is found locally, from its exact count scaled by
        each part's bytes (with ``FIT_HEADROOM`` to spare)."""
        everything = len(parts.passages or [])
        budget = plan.window - plan.max_tokens
        messages = build_messages(parts)
        bound = token_upper_bound(messages)
        if bound <= budget:
            return messages, bound, everything, False
        count = await self.dispatcher.count_prompt_tokens(
            plan.route, model, messages, cost=bound + plan.max_tokens)
        if count <= budget:
            return messages, count, everything, True
        density = count / bound * (1 + FIT_HEADROOM)  # tokens per byte of this prompt
        # Dropping the oldest history messages takes their bytes off the bound.
        dropped = 0
        for history_from, m in enumerate(parts.history, start=1):
            dropped += len(defuse(m["content"]).encode()) + TEMPLATE_TOKENS_PER_MESSAGE
            if math.ceil((bound - dropped) * density) <= budget:
                candidate = build_messages(parts, history_from=history_from)
                return candidate, math.ceil((bound - dropped) * density), everything, False
        for keep in range(everything - 1, -1, -1):
            candidate = build_messages(parts, history_from=len(parts.history), passages=keep)
            estimate = math.ceil(token_upper_bound(candidate) * density)
            if estimate <= budget:
                return candidate, estimate, keep, False
        bare = build_messages(parts, history_from=len(parts.history), passages=0)
        n = count if not parts.history and not everything \
            else math.ceil(token_upper_bound(bare) * count / bound)
        raise ContextLengthError(
            f"the message is too long: about {n} prompt tokens even without history or "
            f"passages; the model's context window is {plan.window} tokens and max_tokens "
            f"is {plan.max_tokens}", context_window=plan.window)


def _citation(index: int, chunk: RetrievedChunk, snippet_chars: int) -> Citation:
    return Citation(index=index, chunk_id=chunk.chunk_id, document_id=chunk.document_id,
                    kb_id=chunk.kb_id, filename=chunk.filename, page=chunk.page,
                    char_start=chunk.char_start, char_end=chunk.char_end,
                    heading_path=chunk.heading_path, score=chunk.score,
                    snippet=chunk.text[:snippet_chars],
                    suspected_instructions=chunk.suspected_instructions)


_DETACHED: set[asyncio.Task[None]] = set()
_DISPATCH_REFUSALS = frozenset({QueueTimeoutError.code, NoCapacityError.code})


def pending_wrap_ups() -> int:
    """Conversation writes and usage events still being written (tests wait for 0)."""
    return len(_DETACHED)


async def wrap_ups_done(timeout_s: float) -> None:
    """Until the wrap-ups under way now have finished (at most ``timeout_s``)."""
    tasks = list(_DETACHED)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)


def _detach(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coro`` as its own task, kept alive until done (cancelling the caller does
    not cancel it)."""
    task = asyncio.ensure_future(coro)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)
    return task


def _fresh_metering_id(request_id: str) -> str:
    """A usage event id of its own for a request whose client id is metered under
    another event ('/' never occurs in a client's id; 100 characters at most)."""
    return f"{request_id[:67]}/{new_id()}"


def _usage(raw: Any) -> Usage | None:
    """The engine's usage object, if it sent a usable one."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(prompt, completion, cached_tokens=cached if isinstance(cached, int) else 0)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
