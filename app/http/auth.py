"""Authentication middleware: every request except health and docs needs a key."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.auth.authenticator import ApiKeyAuthenticator
from app.auth.principal import Principal, TenantPrincipal
from app.errors import AuthenticationError
from app.logs import set_log_tenant

PUBLIC_PATHS = {"/healthz", "/readyz", "/docs"}


async def authenticate_bearer(authenticator: ApiKeyAuthenticator,
                              header: str | None) -> tuple[Principal, str]:
    """The principal of an ``Authorization: Bearer <key>`` header, and the key; the
    request's log lines name its tenant from here on."""
    if not header:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
    principal = await authenticator.authenticate(token)
    set_log_tenant(principal.tenant_id if isinstance(principal, TenantPrincipal) else None)
    return principal, token


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Reads ``Authorization: Bearer <key>`` and resolves it to a principal."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        principal, token = await authenticate_bearer(connection.app.state.authenticator,
                                                     connection.headers.get("authorization"))
        return AuthenticationResult(user=principal, auth=token)
