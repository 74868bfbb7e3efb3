"""The Litestar app factory: each area's routes and providers (its package's ``ROUTES``
and ``DEPENDENCIES``, listed in :data:`AREAS`), errors, the middleware, the lifespan that
opens the clients (app/server/clients.py), and the fast chat door when it is on."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from app import observability
from app.domain import (
    audit,
    chat,
    console,
    content_rules,
    embed,
    keys,
    knowledge,
    pools,
    search,
    system,
    tenant_self,
    tenants,
    usage,
)
from app.domain.chat.service import ChatService
from app.domain.pools.deps import provide_dispatcher
from app.embeddings import Models
from app.hardening import refuse_inspection
from app.http.auth import PUBLIC_PATHS, ApiKeyMiddleware
from app.http.bodies import ApiRequest
from app.http.cors import CorsMiddleware
from app.http.openapi import document_problems
from app.http.problems import EXCEPTION_HANDLERS
from app.http.request_context import request_middleware
from app.http.sessions import COOKIE as CONSOLE_COOKIE
from app.http.timestamps import UtcDateTimeSchema, decode_utc, is_utc_datetime
from app.server.chat_pipeline import check_middleware
from app.server.clients import build_chat, open_clients
from app.server.fast_chat import ChatEndpoint, is_chat_request
from app.settings import Settings

Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


# The areas whose routes and providers the app serves (each package's ROUTES and
# DEPENDENCIES): a new area is one more entry here.
AREAS: tuple[Any, ...] = (system, tenant_self, tenants, keys, knowledge, search, chat,
                          pools, usage, observability, audit, embed, content_rules, console)


def _lifespan(settings: Settings, extras: Sequence[Lifespan], models: Models | None) -> Lifespan:
    @asynccontextmanager
    async def clients(app: Litestar) -> AsyncIterator[None]:
        refuse_inspection("API")  # its secrets unreadable to the parsers' user
        async with AsyncExitStack() as stack:
            await open_clients(app, settings, stack, models)  # app/server/clients.py
            for extra in extras:
                await stack.enter_async_context(extra(app))
            # What start-up loaded (models, libraries: millions of objects) lives as long
            # as the process: out of the collector's sight, or each full collection walks
            # it all (a third of a second here, stalling every request in flight).
            gc.collect()
            gc.freeze()
            yield

    return clients


def provide_settings(state: State) -> Settings:
    """The process's settings."""
    settings: Settings = state.settings
    return settings


def provide_chat(state: State) -> ChatService:
    """The chat service the lifespan built (app/server/clients.py); 503 when no
    generation server is configured. Built again when the dispatcher or limiter in the
    state is swapped for another (tests do)."""
    dispatcher = provide_dispatcher(state)
    if state.get("chat_parts") != (dispatcher, state.limiter):
        build_chat(state)
    service: ChatService = state.chat_service
    return service


def routes() -> list[Any]:
    """Every area's route handlers and controllers."""
    return [handler for area in AREAS for handler in area.ROUTES]


def dependencies() -> dict[str, Provide]:
    """Every area's providers by name, and the composition root's own; a name that two
    areas provide fails here, not at the first request."""
    merged = {"settings": Provide(provide_settings, sync_to_thread=False),
              "chat": Provide(provide_chat, sync_to_thread=False)}
    for area in AREAS:
        for name, provider in getattr(area, "DEPENDENCIES", {}).items():
            if name in merged:
                raise RuntimeError(f"dependency {name!r} is provided twice ({area.__name__})")
            merged[name] = provider
    return merged


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
            "consoleSession": SecurityScheme(type="apiKey", name=CONSOLE_COOKIE,
                                             security_scheme_in="cookie",
                                             description="A console session (/console)"),
        }),
        security=[{"apiKey": []}],
    )
    app = Api(
        route_handlers=routes(),
        dependencies=dependencies(),
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
    # With tracing on, Litestar's route serves chat (its requests get server spans).
    if settings.server.fast_chat and not settings.tracing.exporter_otlp_endpoint:
        check_middleware(app.middleware)  # the fast door runs exactly these (loudly if not)
        app.fast_chat = ChatEndpoint(app, provide_chat, settings.server.max_request_bytes)
    return app
