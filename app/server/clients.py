"""The API process's long-lived clients, opened by the app's lifespan and kept in its state.

One place builds what every request shares: the database pool and vector store (through
app/stores.py, as the worker runtime does), Redis and the limiter's script pipe, the
embedding models and reranker, the usage writer, the dispatcher over the configured
pools, authentication (credential cache, change listener, embed tokens), the allowed
CORS origins, the metrics registry, and the chat service built from them once. Each is
closed, in reverse order, when the lifespan's exit stack unwinds.
"""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from litestar import Litestar
from litestar.datastructures import State

from app.auth.attempts import SignInAttempts
from app.auth.authenticator import ApiKeyAuthenticator
from app.auth.cache import CredentialCache, CredentialChangeListener, credential_owner
from app.auth.embed import EmbedTokenSigner
from app.auth.sessions import SessionStore
from app.db.engine import Database
from app.domain.chat.background import BackgroundWrites
from app.domain.chat.content import matching_threads
from app.domain.chat.conversations import ConversationService
from app.domain.chat.service import ChatService
from app.domain.content_rules.service import ContentRulesService
from app.domain.search.deps import provide_search
from app.domain.tenants.service import TenantService
from app.embeddings import Models, check_vector_size, load_models
from app.http.cors import AllowedOrigins
from app.inference.dispatcher import Dispatcher
from app.inference.pools import configured_pools
from app.observability.metrics import DispatchCollector, ServiceMetrics
from app.quotas.limiter import RateLimiter
from app.quotas.pipe import RedisPipe
from app.quotas.usage import UsageService
from app.quotas.usage_writer import UsageWriter
from app.settings import Settings
from app.stores import open_database, open_store
from retrieval.rerank import Reranker


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


async def open_clients(app: Litestar, settings: Settings, stack: AsyncExitStack,
                       models: Models | None) -> None:
    """Open every client into ``app.state`` (closed by ``stack``), then build the chat
    service from them."""
    db = await open_database(stack, settings, "API")  # before serving any tenant
    redis = make_redis(settings)
    stack.push_async_callback(redis.aclose)
    scripts = RedisPipe(redis_url(settings), timeout_s=settings.redis.socket_timeout_s,
                        max_in_flight=settings.redis.max_in_flight)
    stack.push_async_callback(scripts.aclose)
    vector_store = open_store(stack, settings)
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
    q = settings.quota
    app.state.update(
        db=db, redis=redis, vector_store=vector_store, models=loaded,
        dispatcher=dispatcher, metrics=_metrics(app, settings), usage_writer=usage_writer,
        background=background, matching_threads=matching,
        limiter=RateLimiter(redis, namespace=f"{settings.worker.namespace}:q",
                            lease_ttl_s=q.lease_ttl_s, fail_open=q.fail_open,
                            scripts=scripts, idempotency_window_s=q.idempotency_window_s),
        reranker=reranker,
        **await _authentication(settings, db, stack),
        **_console(settings, redis),
    )
    if dispatcher is not None:
        build_chat(app.state)


async def _authentication(settings: Settings, db: Database,
                          stack: AsyncExitStack) -> dict[str, Any]:
    """The authenticator (with its credential cache, kept fresh across processes by a
    change listener), the embed token signer and the allowed CORS origins."""
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
    authenticator = ApiKeyAuthenticator(
        db, settings.auth.key_pepper.get_secret_value(),
        admin_key.get_secret_value() if admin_key else None,
        timedelta(seconds=settings.auth.last_used_resolution_s), credentials, embed_signer,
        # half the pool at most: a flood of made-up keys leaves the rest
        max_lookups=max(1, settings.database.pool_size // 2),
    )
    return {"authenticator": authenticator, "embed_signer": embed_signer,
            "allowed_origins": allowed_origins}


def _console(settings: Settings, redis: aioredis.Redis) -> dict[str, Any]:
    """The web console's session store and sign-in limiter, on the app's Redis."""
    c, namespace = settings.console, settings.worker.namespace
    return {"console_sessions": SessionStore(redis, namespace, c.session_idle_s,
                                             c.session_max_s),
            "signin_attempts": SignInAttempts(redis, namespace, c.signin_per_minute)}


def _metrics(app: Litestar, settings: Settings) -> ServiceMetrics:
    """The service's Prometheus registry, reading the dispatcher from the state (so it
    follows a swapped one)."""
    metrics = ServiceMetrics(settings.metrics.max_tenant_labels,
                             lambda: app.state.dispatcher.models
                             if app.state.dispatcher else ())
    metrics.registry.register(DispatchCollector(lambda: app.state.dispatcher))
    return metrics


def build_chat(state: State) -> None:
    """Build the chat service over the state's clients into ``state.chat_service`` (the
    lifespan does, once; again only when the dispatcher or limiter is swapped), noting
    in ``state.chat_parts`` which ones it holds."""
    settings: Settings = state.settings
    state.chat_parts = (state.dispatcher, state.limiter)
    state.chat_service = ChatService(
        provide_search(state), ConversationService(state.db), state.dispatcher, settings.llm,
        settings.chat, UsageService(state.db, state.usage_writer), state.limiter,
        state.background, state.matching_threads, state.metrics,
        ContentRulesService(state.db), tenants=TenantService(state.db))
