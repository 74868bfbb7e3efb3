"""Authentication middleware: every request except health and docs needs a key."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.auth.authenticator import ApiKeyAuthenticator
from app.auth.principal import TenantPrincipal
from app.errors import AuthenticationError
from app.logs import set_log_tenant

PUBLIC_PATHS = {"/healthz", "/readyz", "/docs"}


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Reads ``Authorization: Bearer <key>`` and resolves it to a principal."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        header = connection.headers.get("authorization")
        if not header:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>'"
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
        authenticator: ApiKeyAuthenticator = connection.app.state.authenticator
        principal = await authenticator.authenticate(token.strip())
        set_log_tenant(principal.tenant_id if isinstance(principal, TenantPrincipal) else None)
        return AuthenticationResult(user=principal, auth=token.strip())
