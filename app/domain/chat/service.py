"""The chat request's one owner: :meth:`ChatService.answer` takes an authenticated
request in order through plan (model, messages, room in the context window) -> admit
(rate limits, concurrency, budget, idempotency; a replay gets the first answer) ->
prepare (content rules on the input, history, retrieval, the prompt fitted to the
window) -> a refusal, the whole answer, or an opened stream, generated through the
dispatcher (pools, replicas, fair queues, failover); the parts live beside it: the
request's data in answer.py, window fitting in context_fit.py, the streamed answer and
refusals in relay.py, how a request ends (settlement, usage, metering, stored turn) in
settlement.py.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any

from app.db.models import SystemMessagePolicy, Tenant
from app.domain.chat import context_fit
from app.domain.chat.answer import (
    STREAM_HEADERS,
    AnswerState,
    ChatReply,
    Plan,
    Prepared,
    citation,
    response_id,
    usage_of,
)
from app.domain.chat.background import BackgroundWrites
from app.domain.chat.content import CONTENT_FILTER, AnswerFilter
from app.domain.chat.conversations import ConversationService
from app.domain.chat.prompt import PromptParts, caller_instructions, prompt_estimate
from app.domain.chat.relay import Relay
from app.domain.chat.replay import StoredAnswer, replayed, request_hash
from app.domain.chat.schemas import ChatCompletionRequest
from app.domain.chat.settlement import Settlement
from app.domain.content_rules.service import ContentRulesService
from app.domain.search.schemas import RetrievedChunk
from app.domain.search.service import SearchService
from app.domain.tenants.service import TenantService, allowed_models
from app.errors import (
    BadRequestError,
    ContextLengthError,
    DomainError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ServiceUnavailableError,
)
from app.inference.dispatcher import (
    Disconnected,
    Dispatched,
    DispatchedStream,
    Dispatcher,
    TenantRoute,
)
from app.observability.metrics import ServiceMetrics
from app.quotas.limiter import Claim, LeaseKeeper, Limits, RateLimiter, Ticket
from app.quotas.policy import limits_for
from app.quotas.usage import UsageService
from app.settings import ChatSettings, LlmSettings

SHORT_QUESTION_WORDS = 6


class ChatService:
    """Answers a chat request grounded in the tenant's documents."""

    def __init__(self, search: SearchService, conversations: ConversationService,
                 dispatcher: Dispatcher, llm: LlmSettings, chat: ChatSettings,
                 usage: UsageService, limiter: RateLimiter | None,
                 background: BackgroundWrites, matching: Executor | None = None,
                 metrics: ServiceMetrics | None = None,
                 content: ContentRulesService | None = None,
                 tenants: TenantService | None = None) -> None:
        self.search = search
        self.conversations = conversations
        self.dispatcher = dispatcher
        self.llm = llm
        self.chat = chat
        self.limiter = limiter
        self.matching = matching  # the threads that match content rules (app-wide)
        self.metrics = metrics
        self.tenants = tenants or TenantService(conversations.db)
        self.settlement = Settlement(dispatcher, limiter, usage, conversations, background,
                                     metrics, content)
        self.relay = Relay(self.settlement, limiter)

    async def answer(self, tenant: Tenant, req: ChatCompletionRequest,
                     request_id: str | None = None, scope: str = "",
                     disconnected: Disconnected | None = None) -> ChatReply:
        """The chat completion for an authenticated, authorized request: a whole answer
        or a stream of server-sent events. Limits come before any work: a refused
        request costs one Redis round trip. ``request_id`` (the client's
        ``X-Request-Id``) and ``scope`` (who asks) make it idempotent; ``disconnected``
        returns when the client has gone (a request waiting for a slot leaves the
        queue)."""
        plan = await self.plan(tenant, req, request_id, scope)
        # 429 here (rate limits, concurrency, budget), or 409 for a request id in use; a
        # content-rule refusal below still counts as a request.
        ticket = await self.admit(tenant, req, plan)
        if ticket is not None and ticket.replay is not None:
            return replayed(StoredAnswer.loads(ticket.replay), req)
        prepared = await self.prepare(tenant, req, plan, ticket)
        if prepared.refused:  # the message breaks the tenant's content rules
            if req.stream:
                return ChatReply(events=self.relay.refusal_stream(tenant, prepared))
            return ChatReply(json=self.relay.refusal(tenant, prepared))
        await self.start_conversation(tenant, prepared)
        headers = prepared.ticket.headers if prepared.ticket else {}
        if req.stream:
            # 502/504 here, not mid-stream
            upstream = await self.open_stream(tenant, prepared, disconnected)
            return ChatReply(events=self.relay.stream(tenant, prepared, upstream),
                             headers={**STREAM_HEADERS, **headers})
        return ChatReply(json=await self.complete(tenant, prepared, disconnected),
                         headers=headers)

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
        max_tokens = context_fit.max_tokens(self.llm, tenant, req)
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
                lambda period: self.settlement.metered_tokens(tenant.id, period), plan.claim)
        except (RateLimitedError, ServiceUnavailableError) as exc:
            if self.metrics is not None:
                self.metrics.rejected(tenant.slug, exc.code)
            raise

    async def prepare(self, tenant: Tenant, req: ChatCompletionRequest, plan: Plan,
                      ticket: Ticket | None) -> Prepared:
        """After admission: the tenant's content rules, history, retrieval, and the
        prompt within the context window. A failure here settles the admission (nothing
        was generated, so a claimed request id is freed for a retry)."""
        try:
            return await self._prepare(tenant, req, plan, ticket)
        except BaseException:
            if ticket is not None and self.limiter is not None:
                await asyncio.shield(self.limiter.settle(ticket, 0))
            raise

    async def _prepare(self, tenant: Tenant, req: ChatCompletionRequest, plan: Plan,
                       ticket: Ticket | None) -> Prepared:
        end_user = req.user or ""
        turns = plan.turns
        answer_filter = AnswerFilter.of(tenant, self.chat, self.matching)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        sent = "\n".join([*plan.caller_system, *(t["content"] for t in turns)])
        if await answer_filter.check_input(sent) is not None:
            # Refused: answered without retrieval or generation.
            rid = response_id()
            return Prepared(
                request_id=rid, created=int(time.time()), model=req.model, route=plan.route,
                body={}, citations=[], turns=turns, include_usage=include_usage,
                prompt_tokens_bound=0, end_user=end_user, store=False, ticket=ticket,
                filter=answer_filter, refused=answer_filter.hit,
                state=AnswerState(metering_id=plan.request_id or rid,
                                  status="content_blocked", finish_reason=CONTENT_FILTER))
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
        messages, bound, kept, exact = await context_fit.fit(self.dispatcher, plan,
                                                             req.model, parts)
        citations = await answer_filter.citations(
            [citation(i, p, self.chat.snippet_chars)
             for i, p in enumerate((passages or [])[:kept], start=1)])
        body: dict[str, Any] = {
            "model": req.model, "messages": messages, "max_tokens": plan.max_tokens,
            "stream": req.stream, **req.sampling(),
        }  # the dispatcher adds the tenant's cache_salt (and priority where the pool uses it)
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        rid = response_id()
        return Prepared(
            request_id=rid, created=int(time.time()), model=req.model, route=plan.route,
            body=body, citations=citations, turns=turns, include_usage=include_usage,
            prompt_tokens_bound=bound, end_user=end_user, store=req.store, ticket=ticket,
            filter=answer_filter, prompt_tokens=bound if exact else None,
            state=AnswerState(metering_id=plan.request_id or rid,
                              conversation_id=conversation_id if req.store else None))

    async def start_conversation(self, tenant: Tenant, p: Prepared) -> None:
        """Start the conversation if this is a new one (a refused request leaves none)."""
        if p.state.conversation_id is None and p.store:
            try:
                p.state.conversation_id = await self.conversations.start(
                    tenant.id, p.end_user, p.turns[-1]["content"])
            except BaseException:
                p.state.status = "error"
                await asyncio.shield(self.settlement.finish_behind(tenant, p))
                raise

    async def complete(self, tenant: Tenant, p: Prepared,
                       disconnected: Disconnected | None = None) -> dict[str, Any]:
        """A non-streaming answer, in OpenAI's format plus citations; metered however
        it ends."""
        s = p.state
        try:
            response, s.where = await self._generate(p, disconnected)
            response["id"], response["model"] = p.request_id, p.model
            response["created"] = p.created
            response["citations"] = p.citation_dicts()
            response["conversation_id"] = p.conversation()
            choices = response.get("choices") or [{}]
            answer = str((choices[0].get("message") or {}).get("content") or "")
            s.finish_reason = choices[0].get("finish_reason")
            shown, stopped = await p.filter.whole(answer)
            if shown != answer and choices[0].get("message") is not None:
                choices[0]["message"]["content"] = shown
            if stopped:
                choices[0]["finish_reason"] = s.finish_reason = CONTENT_FILTER
                self.settlement.note_hit(tenant, p, "output")
            s.usage = usage_of(response.get("usage"))
            if s.usage is None:
                s.usage = await self.settlement.count_usage(p, answer)
                response["usage"] = s.usage.as_dict()
            s.status = "content_blocked" if stopped else "ok"
            s.response, s.shown = response, [shown]  # what a replay of its id gets
        except DomainError as exc:
            s.status = exc.code
            raise
        finally:
            # Settled behind the answer, its usage event written after that. The
            # limiter knows: the tenant's next request, if refused meanwhile, waits for
            # the settlement and asks again (a client's next request never finds its
            # finished one still holding a slot).
            settled = self.settlement.finish_behind(tenant, p)
            if p.ticket is not None and self.limiter is not None:
                self.limiter.settling(p.ticket, settled)
        await self.settlement.record(tenant, p, shown)
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
            p.state.status = exc.code if isinstance(exc, DomainError) else "client_closed"
            await asyncio.shield(self.settlement.finish_behind(tenant, p))
            raise
        p.state.where = stream.where
        return stream

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
