"""The Litestar app factory: routes, dependencies, errors, and the clients' lifespan."""

from __future__ import annotations

import asyncio
import gc
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from app.auth.authenticator import ApiKeyAuthenticator
from app.auth.cache import CredentialCache, CredentialChangeListener, credential_owner
from app.auth.embed import EmbedTokenSigner
from app.db.engine import Database, make_engine
from app.db.role_check import refuse_privileged_role
from app.domain.audit.controllers import admin_audit, tenant_audit
from app.domain.audit.service import AuditService
from app.domain.chat.background import BackgroundWrites
from app.domain.chat.content import matching_threads
from app.domain.chat.controllers import ConversationController, chat_completions
from app.domain.chat.conversations import ConversationService
from app.domain.chat.service import ChatService
from app.domain.content_rules.controllers import (
    get_content_rules,
    list_content_rule_hits,
    put_content_rules,
)
from app.domain.content_rules.service import ContentRulesService
from app.domain.embed.controllers import (
    get_embed_settings,
    mint_embed_token,
    put_embed_settings,
)
from app.domain.embed.service import EmbedService
from app.domain.keys.controllers import PlatformKeysController, TenantKeysController
from app.domain.keys.service import ApiKeyService
from app.domain.knowledge.controllers import KnowledgeBaseController
from app.domain.knowledge.document_service import DocumentService
from app.domain.knowledge.kb_service import KnowledgeBaseService
from app.domain.pools.controllers import list_pools
from app.domain.search.controllers import retrieve
from app.domain.search.service import SearchService
from app.domain.system.controllers import healthz, readyz
from app.domain.tenant_self.controllers import (
    get_system_prompt,
    list_models,
    list_system_prompt_versions,
    put_system_prompt,
    whoami,
)
from app.domain.tenants.controllers import TenantAdminController
from app.domain.tenants.prompts import PromptService
from app.domain.tenants.service import TenantService
from app.domain.usage.controllers import admin_usage, tenant_usage
from app.domain.usage.quarantine import admin_usage_quarantine
from app.embeddings import Models, check_vector_size, load_models
from app.errors import ServiceUnavailableError
from app.hardening import refuse_inspection
from app.http.auth import PUBLIC_PATHS, ApiKeyMiddleware
from app.http.bodies import ApiRequest
from app.http.cors import AllowedOrigins, CorsMiddleware
from app.http.openapi import document_problems
from app.http.problems import EXCEPTION_HANDLERS
from app.http.request_context import request_middleware
from app.http.timestamps import UtcDateTimeSchema, decode_utc, is_utc_datetime
from app.inference.dispatcher import Dispatcher
from app.inference.pools import configured_pools
from app.observability.metrics import DispatchCollector, ServiceMetrics
from app.observability.routes import prometheus_metrics
from app.quotas.limiter import RateLimiter
from app.quotas.pipe import RedisPipe
from app.quotas.usage import UsageService
from app.quotas.usage_writer import UsageWriter
from app.server.fast_chat import ChatEndpoint, is_chat_request
from app.settings import Settings
from app.stores import vector_store_config
from retrieval.rerank import Reranker
from retrieval.vectorstore import open_vector_store

Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


def redis_url(settings: Settings) -> str:
    if not settings.redis.url:
        raise ValueError("REDIS_URL is not set")
    return settings.redis.url


def make_redis(settings: Settings) -> aioredis.Redis:
    """A Redis client over a bounded pool that waits (not fails) briefly when full."""
    r = settings.redis
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url(settings), max_connections=r.max_connections, timeout=r.socket_timeout_s,
        socket_timeout=r.socket_timeout_s, socket_connect_timeout=r.socket_timeout_s,
    )
    return aioredis.Redis(connection_pool=pool)


def _lifespan(settings: Settings, extras: Sequence[Lifespan], models: Models | None) -> Lifespan:
    @asynccontextmanager
    async def clients(app: Litestar) -> AsyncIterator[None]:
        refuse_inspection("API")  # its secrets unreadable to the parsers' user
        async with AsyncExitStack() as stack:
            db = Database(make_engine(settings.database.application_url(), settings.database))
            stack.push_async_callback(db.close)
            await refuse_privileged_role(db.engine, "API")  # before serving any tenant
            redis = make_redis(settings)
            stack.push_async_callback(redis.aclose)
            scripts = RedisPipe(redis_url(settings), timeout_s=settings.redis.socket_timeout_s,
                                max_in_flight=settings.redis.max_in_flight)
            stack.push_async_callback(scripts.aclose)
            vector_store = open_vector_store(vector_store_config(settings))
            stack.push_async_callback(vector_store.close)
            loaded = models if models is not None else await asyncio.to_thread(
                load_models, settings.ingest)
            check_vector_size(loaded, settings.qdrant.dense_dim)
            rerank_model = settings.chat.rerank_model
            reranker = await asyncio.to_thread(Reranker, rerank_model) if rerank_model else None
            usage_writer = UsageWriter(db, on_quarantine=lambda kind, error:
                                       app.state.metrics.quarantined(kind, error))
            usage_writer.start()
            stack.push_async_callback(usage_writer.close)  # drained before the pool closes
            dispatcher = make_dispatcher(settings)
            if dispatcher is not None:
                await dispatcher.start()
                stack.push_async_callback(dispatcher.close)
            background = BackgroundWrites()  # chat's writes behind answers: at shutdown,
            stack.push_async_callback(background.close)  # awaited before the rest closes
            matching = matching_threads(settings.chat)  # content rules, all tenants
            stack.callback(matching.shutdown)
            admin_key = settings.auth.platform_admin_key
            embed_signer = EmbedTokenSigner(settings.auth.embed_key())
            credentials = CredentialCache(settings.auth.cache_ttl_s,
                                          negative_ttl_s=settings.auth.negative_cache_ttl_s)
            db.on_commit(credential_owner, credentials.drop_tenants)  # this process: at once
            allowed_origins = AllowedOrigins(db)
            db.on_commit(credential_owner, allowed_origins.invalidate)
            if settings.auth.cache_ttl_s > 0:
                listener = CredentialChangeListener(
                    "postgresql://" + settings.database.application_url().partition("://")[2],
                    credentials)
                listener.start()
                stack.push_async_callback(listener.close)
            metrics = ServiceMetrics(settings.metrics.max_tenant_labels,
                                     lambda: app.state.dispatcher.models
                                     if app.state.dispatcher else ())
            metrics.registry.register(DispatchCollector(lambda: app.state.dispatcher))
            app.state.update(
                db=db, redis=redis, vector_store=vector_store, models=loaded,
                dispatcher=dispatcher, metrics=metrics, usage_writer=usage_writer,
                background=background, matching_threads=matching,
                allowed_origins=allowed_origins, embed_signer=embed_signer,
                limiter=RateLimiter(redis, namespace=f"{settings.worker.namespace}:q",
                                    lease_ttl_s=settings.quota.lease_ttl_s,
                                    fail_open=settings.quota.fail_open, scripts=scripts,
                                    idempotency_window_s=settings.quota.idempotency_window_s),
                reranker=reranker,
                authenticator=ApiKeyAuthenticator(
                    db, settings.auth.key_pepper.get_secret_value(),
                    admin_key.get_secret_value() if admin_key else None,
                    timedelta(seconds=settings.auth.last_used_resolution_s), credentials,
                    embed_signer,
                    # half the pool at most: a flood of made-up keys leaves the rest
                    max_lookups=max(1, settings.database.pool_size // 2),
                ),
            )
            for extra in extras:
                await stack.enter_async_context(extra(app))
            # What start-up loaded (models, libraries: millions of objects) lives as long
            # as the process: out of the collector's sight, or each full collection walks
            # it all (a third of a second here, stalling every request in flight).
            gc.collect()
            gc.freeze()
            yield

    return clients


def provide_tenants(state: State) -> TenantService:
    """The tenant registry service."""
    return TenantService(state.db)


def provide_keys(state: State) -> ApiKeyService:
    """The API key service."""
    return ApiKeyService(state.db, state.settings.auth.key_pepper.get_secret_value())


def provide_kbs(state: State) -> KnowledgeBaseService:
    """The knowledge-base service."""
    return KnowledgeBaseService(state.db)


def provide_documents(state: State) -> DocumentService:
    """The document service."""
    return DocumentService(state.db, state.settings.ingest)


def provide_search(state: State) -> SearchService:
    """The retrieval service."""
    return SearchService(state.db, state.vector_store, state.models, state.settings.chat,
                         state.reranker)


def provide_settings(state: State) -> Settings:
    """The process's settings."""
    settings: Settings = state.settings
    return settings


def provide_content_rules(state: State) -> ContentRulesService:
    """The tenant's content rules."""
    return ContentRulesService(state.db)


def provide_embed(state: State) -> EmbedService:
    """Embed tokens and allowed origins."""
    settings: Settings = state.settings
    return EmbedService(state.db, state.embed_signer, settings.auth)


def provide_prompts(state: State) -> PromptService:
    """The tenant system prompt service."""
    return PromptService(state.db)


def provide_audit(state: State) -> AuditService:
    """The audit log reader."""
    return AuditService(state.db)


def provide_conversations(state: State) -> ConversationService:
    """The conversation store."""
    return ConversationService(state.db)


def cache_salt_key(settings: Settings) -> bytes:
    """The key of the per-tenant ``cache_salt`` HMAC (derived from the key pepper)."""
    return hashlib.sha256(b"cache-salt:" + settings.auth.key_pepper.get_secret_value()
                          .encode()).digest()


def make_dispatcher(settings: Settings) -> Dispatcher | None:
    """The dispatcher over the configured pools, or None when none is configured."""
    pools = configured_pools(settings)
    if pools is None:
        return None
    return Dispatcher(pools, settings.dispatch, settings.llm, cache_salt_key(settings))


def provide_dispatcher(state: State) -> Dispatcher:
    """The generation dispatcher; 503 when no pool is configured."""
    if state.dispatcher is None:
        raise ServiceUnavailableError("no generation server is configured (set LLM_BASE_URL "
                                      "or DISPATCH_POOLS_FILE)")
    dispatcher: Dispatcher = state.dispatcher
    return dispatcher


def provide_chat(state: State) -> ChatService:
    """The chat service; 503 when no generation server is configured. Built once and
    kept (the chat path is the hot one), rebuilt when a part it holds is swapped."""
    dispatcher = provide_dispatcher(state)
    parts = (dispatcher, state.limiter, state.db, state.vector_store, state.models,
             state.usage_writer, state.metrics, state.reranker, state.background)
    cached = state.get("chat_service")
    if cached is not None and all(a is b for a, b in zip(cached[0], parts, strict=True)):
        service: ChatService = cached[1]
        return service
    settings: Settings = state.settings
    service = ChatService(provide_search(state), ConversationService(state.db),
                          dispatcher, settings.llm, settings.chat,
                          UsageService(state.db, state.usage_writer), state.limiter,
                          state.background, state.matching_threads,
                          state.metrics, ContentRulesService(state.db),
                          tenants=TenantService(state.db))
    state.chat_service = (parts, service)
    return service


class Api(Litestar):
    """The Litestar app, with ``POST /v1/chat/completions`` answered by ``fast_chat``
    (outside Litestar's layers: app/server/fast_chat.py) when it is set."""

    fast_chat: ChatEndpoint | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Application entry point."""
        if self.fast_chat is not None and is_chat_request(scope):
            scope["app"] = scope["litestar_app"] = self
            scope.setdefault("state", {})
            await self.fast_chat(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings, *, extra_lifespans: Sequence[Lifespan] = (), models: Models | None = None
) -> Api:
    """Build the API. ``extra_lifespans`` lets the composition root (the CLI) add, for
    example, in-process worker threads without the request path importing workers;
    ``models`` lets a caller share already-loaded embedding models (tests do)."""
    openapi = OpenAPIConfig(
        title="tenantrag", version="0.1.0", path="/docs",
        render_plugins=[SwaggerRenderPlugin()],
        components=Components(security_schemes={
            "apiKey": SecurityScheme(type="http", scheme="bearer",
                                     description="A tenant key (trk_...) or the operator key"),
        }),
        security=[{"apiKey": []}],
    )
    app = Api(
        route_handlers=[healthz, readyz, whoami, list_models, TenantAdminController,
                        PlatformKeysController, TenantKeysController, KnowledgeBaseController,
                        retrieve, chat_completions, ConversationController,
                        get_system_prompt, put_system_prompt, list_system_prompt_versions,
                        list_pools, tenant_usage, admin_usage, prometheus_metrics,
                        tenant_audit, admin_audit, admin_usage_quarantine,
                        mint_embed_token, get_embed_settings, put_embed_settings,
                        get_content_rules, put_content_rules, list_content_rule_hits],
        dependencies={
            "tenants": Provide(provide_tenants, sync_to_thread=False),
            "keys": Provide(provide_keys, sync_to_thread=False),
            "kbs": Provide(provide_kbs, sync_to_thread=False),
            "documents": Provide(provide_documents, sync_to_thread=False),
            "search": Provide(provide_search, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            "prompts": Provide(provide_prompts, sync_to_thread=False),
            "embed": Provide(provide_embed, sync_to_thread=False),
            "content": Provide(provide_content_rules, sync_to_thread=False),
            "audit": Provide(provide_audit, sync_to_thread=False),
            "conversations": Provide(provide_conversations, sync_to_thread=False),
            "chat": Provide(provide_chat, sync_to_thread=False),
            "dispatcher": Provide(provide_dispatcher, sync_to_thread=False),
        },
        middleware=[*request_middleware(settings), CorsMiddleware,  # preflights: no key
                    DefineMiddleware(ApiKeyMiddleware, exclude=[f"^{p}" for p in PUBLIC_PATHS])],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[_lifespan(settings, extra_lifespans, models)],
        openapi_config=openapi,
        request_max_body_size=settings.server.max_request_bytes,
        request_class=ApiRequest,  # JSON bodies decoded in one place (app/http/bodies.py)
        type_decoders=[(is_utc_datetime, decode_utc)],  # date-time query parameters
        plugins=[UtcDateTimeSchema()],
        state=State({"settings": settings}),
        debug=False,
        logging_config=None,  # the process's logging is app/logs.py's (JSON lines, ids)
    )
    document_problems(app)
    if not settings.tracing.exporter_otlp_endpoint:  # with tracing: Litestar's route, spans
        app.fast_chat = ChatEndpoint(app, provide_chat, settings.server.max_request_bytes)
    return app
