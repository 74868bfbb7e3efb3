"""CORS for browser chat UIs, per tenant.

A preflight carries no credential, so it is answered for any origin that some active
tenant allows; the real request then gets ``Access-Control-Allow-Origin`` only when the
authenticated tenant allows that origin (and an embed token used from any other page is
refused with 403 by the chat guard). Every answer to a request with an ``Origin`` varies
on it.
"""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from typing import Any

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)
from sqlmodel import col, select

from app.auth.principal import EmbedPrincipal, TenantPrincipal
from app.db.engine import Database
from app.db.models import Tenant, TenantStatus

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "authorization, content-type, x-request-id"
EXPOSE_HEADERS = ", ".join([
    "x-request-id", "retry-after", "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
    "idempotent-replayed"])
MAX_AGE_S = "600"
error_origin_var: ContextVar[str | None] = ContextVar("cors_error_origin", default=None)


class AllowedOrigins:
    """Every origin some active tenant allows, re-read every ``ttl_s`` or when a tenant
    changes in this process."""

    def __init__(self, db: Database, ttl_s: float = 10.0) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._origins: frozenset[str] = frozenset()
        self._loaded_at = float("-inf")

    async def contains(self, origin: str) -> bool:
        """May a page on ``origin`` call the API (with some tenant's embed token)?"""
        if time.monotonic() - self._loaded_at > self.ttl_s:
            async with self.db.platform() as session:
                rows = (await session.exec(select(Tenant.cors_origins).where(
                    col(Tenant.status) == TenantStatus.active))).all()
            self._origins = frozenset(o for origins in rows for o in origins)
            self._loaded_at = time.monotonic()
        return origin in self._origins

    def invalidate(self, _: object = None) -> None:
        """Re-read on the next preflight."""
        self._loaded_at = float("-inf")


class CorsMiddleware:
    """Answers preflights and adds CORS headers for the caller's tenant's origins."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request."""
        origin = header_of(scope, b"origin") if scope["type"] == ScopeType.HTTP else None
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS" and header_of(scope,
                                                        b"access-control-request-method"):
            await _preflight(send, origin, await allowed_origins_of(scope).contains(origin))
            return

        allowed_anywhere = await note_origin(scope, origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableScopeHeaders.from_message(message)
                headers.add("Vary", "Origin")
                if readable(origin, scope.get("user"), message["status"], allowed_anywhere):
                    headers.update(cors_headers(origin))
            await send(message)

        await self.app(scope, receive, send_with_cors)
        error_origin_var.set(None)


async def note_origin(scope: Scope, origin: str) -> bool:
    """Does some tenant allow ``origin``? Errors (an expired token...) are readable by any
    allowed page: they carry no tenant's data, and the page must be able to show why.
    Errors raised before the route (authentication) are answered outside this middleware:
    problem() adds the headers from ``error_origin_var``, set here (and left set for it,
    as the request id is)."""
    allowed_anywhere = await allowed_origins_of(scope).contains(origin)
    error_origin_var.set(origin if allowed_anywhere else None)
    return allowed_anywhere


def readable(origin: str, user: Any, status: int, allowed_anywhere: bool) -> bool:
    """May the page on ``origin`` read this answer? The caller's tenant allows the
    origin, or it is an error and some tenant allows it."""
    return origin in _tenant_origins(user) or (status >= 400 and allowed_anywhere)


def cors_headers(origin: str) -> dict[str, str]:
    """The headers that let a page on ``origin`` read a response."""
    return {"Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSE_HEADERS, "Vary": "Origin"}


def allowed_origins_of(scope: Scope) -> AllowedOrigins:
    """The process's registry of origins some tenant allows."""
    registry: AllowedOrigins = scope["litestar_app"].state.allowed_origins
    return registry


def _tenant_origins(user: Any) -> list[str]:
    if isinstance(user, TenantPrincipal | EmbedPrincipal) and user.tenant is not None:
        return list(user.tenant.cors_origins)
    return []


async def _preflight(send: Send, origin: str, allowed: bool) -> None:
    if allowed:
        headers = [(b"access-control-allow-origin", origin.encode()),
                   (b"access-control-allow-methods", ALLOW_METHODS.encode()),
                   (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
                   (b"access-control-max-age", MAX_AGE_S.encode()), (b"vary", b"Origin")]
        await send(HTTPResponseStartEvent(type="http.response.start", status=204,
                                          headers=headers))
        await send(HTTPResponseBodyEvent(type="http.response.body", body=b"",
                                         more_body=False))
        return
    body = json.dumps({
        "type": "about:blank", "title": "Forbidden", "status": 403, "code": "forbidden",
        "detail": f"no tenant allows pages on {origin} to call this API",
        "error": {"message": f"origin {origin} is not allowed", "type": "forbidden",
                  "code": "forbidden"}}).encode()
    await send(HTTPResponseStartEvent(type="http.response.start", status=403, headers=[
        (b"content-type", b"application/problem+json"), (b"vary", b"Origin")]))
    await send(HTTPResponseBodyEvent(type="http.response.body", body=body, more_body=False))


def header_of(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` header of the request (lower-case), without building the
    request's Headers."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
