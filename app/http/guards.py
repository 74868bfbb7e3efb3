"""Authorization guards and the helpers controllers use to read the principal."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from app.auth.keys import Grantor, Scope
from app.auth.principal import (
    OPERATOR,
    EmbedPrincipal,
    PlatformPrincipal,
    TenantPrincipal,
    key_actor,
)
from app.db.models import Tenant
from app.errors import AuthenticationError, PermissionDeniedError

# Guards are coroutines: Litestar runs a plain function guard in a worker thread.
EMBED_ONLY_CHATS = ("an embed token may only chat: POST /v1/chat/completions, "
                    "GET /v1/models and the end user's own /v1/conversations")
Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]


async def platform_only(connection: ASGIConnection[Any, Any, Any, Any],
                        _: BaseRouteHandler) -> None:
    """Only the platform operator's key passes."""
    if not isinstance(connection.user, PlatformPrincipal):
        raise PermissionDeniedError("this route needs the platform operator's key")


def requires_scope(*scopes: Scope) -> Guard:
    """A guard letting through tenant keys that carry any of ``scopes``."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = connection.user
        if isinstance(user, EmbedPrincipal):
            raise PermissionDeniedError(EMBED_ONLY_CHATS)
        if isinstance(user, PlatformPrincipal):
            raise PermissionDeniedError(
                "this route needs a tenant API key; the operator uses /admin/tenants/..."
            )
        if not isinstance(user, TenantPrincipal):
            raise AuthenticationError("an API key is required")
        if not user.scopes.intersection(scopes):
            have = ", ".join(sorted(user.scopes)) or "none"
            need = " or ".join(repr(s.value) for s in scopes)
            raise PermissionDeniedError(
                f"this API key lacks the {need} scope (it has: {have})",
                required_scope=scopes[0].value if len(scopes) == 1 else [s.value for s in scopes],
            )

    guard.required_scopes = frozenset(scopes)  # type: ignore[attr-defined]  # tests read it
    return guard


def tenant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> uuid.UUID:
    """The authenticated tenant's id (guards have already ensured there is one)."""
    user = connection.user
    if isinstance(user, EmbedPrincipal):
        raise PermissionDeniedError(EMBED_ONLY_CHATS)
    if not isinstance(user, TenantPrincipal):
        raise AuthenticationError("an API key is required")
    return user.tenant_id


def actor_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who the audit log names for this caller: ``operator`` or ``key:<key id>``."""
    user = connection.user
    if isinstance(user, PlatformPrincipal):
        return OPERATOR
    if isinstance(user, TenantPrincipal):
        return key_actor(user.key_id)
    raise AuthenticationError("an API key is required")


def grantor_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Grantor:
    """The caller as a key manager: a tenant key with its scopes, or the operator."""
    user, actor = connection.user, actor_of(connection)  # actor_of refuses anyone else
    return Grantor(actor, user.scopes if isinstance(user, TenantPrincipal) else None)


def tenant_row(connection: ASGIConnection[Any, Any, Any, Any]) -> Tenant | None:
    """The tenant row read when the caller's key was checked (fresh to within the
    credential cache's TTL, and dropped whenever the tenant changes), if there is one."""
    user = connection.user
    return user.tenant if isinstance(user, TenantPrincipal | EmbedPrincipal) else None


_CHAT_SCOPE = requires_scope(Scope.chat)


async def chat_or_embed(connection: ASGIConnection[Any, Any, Any, Any],
                        handler: BaseRouteHandler) -> None:
    """A tenant key with the ``chat`` scope, or an embed token used from one of its
    tenant's allowed origins (a browser page elsewhere gets 403)."""
    user = connection.user
    if not isinstance(user, EmbedPrincipal):
        await _CHAT_SCOPE(connection, handler)
        return
    origin = connection.headers.get("origin")
    allowed = user.tenant.cors_origins if user.tenant is not None else []
    if origin is not None and origin not in allowed:
        raise PermissionDeniedError(f"pages on {origin} may not use this tenant's embed "
                                    "tokens (see the tenant's allowed origins)", origin=origin)


chat_or_embed.required_scopes = frozenset({Scope.chat})  # type: ignore[attr-defined]


def chat_tenant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> uuid.UUID:
    """The tenant of a chat caller: a tenant key's or an embed token's."""
    user = connection.user
    if isinstance(user, EmbedPrincipal):
        return user.tenant_id
    return tenant_of(connection)


def embed_of(connection: ASGIConnection[Any, Any, Any, Any]) -> EmbedPrincipal | None:
    """The embed token's principal, when the caller is a browser holding one."""
    user = connection.user
    return user if isinstance(user, EmbedPrincipal) else None
