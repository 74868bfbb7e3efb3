"""Signing in to the console and out again: the key checked by the API's own
authenticator, the attempts limited, the session made in Redis (app/auth/sessions.py).

Every refused sign-in gets the same answer, whether the key is unknown, malformed,
revoked, expired, lacks ``admin`` or belongs to a suspended tenant: the answer never
tells whether a key exists.
"""

from __future__ import annotations

from datetime import UTC, datetime

from app.auth.attempts import SignInAttempts
from app.auth.authenticator import ApiKeyAuthenticator
from app.auth.keys import parse_key
from app.auth.principal import Principal, TenantPrincipal
from app.auth.sessions import (
    ConsoleSession,
    SessionStore,
    may_use_console,
    tenant_credential,
)
from app.domain.console.schemas import ConsoleSessionOut
from app.errors import AuthenticationError, PermissionDeniedError

REFUSED = ("sign-in refused: the key is unknown, no longer valid, or lacks the admin "
           "scope (the console takes a tenant key with admin, or the operator key)")


class ConsoleSessions:
    """Sign-in, sign-out and who is signed in, over the lifespan's session store."""

    def __init__(self, authenticator: ApiKeyAuthenticator, store: SessionStore,
                 attempts: SignInAttempts) -> None:
        self.authenticator = authenticator
        self.store = store
        self.attempts = attempts

    async def sign_in(self, key: str, client: str,
                      previous_id: str) -> tuple[str, ConsoleSession, Principal]:
        """A new session for ``key`` (the browser's ``previous_id`` session, if any, is
        ended): its id for the cookie, the session and its principal. Counts one attempt
        for the client's address and for the key's prefix first (429 over the limit)."""
        parsed = parse_key(key)
        await self.attempts.attempt(f"ip:{client}",
                                    *([f"prefix:{parsed.prefix}"] if parsed else []))
        try:
            principal = await self.authenticator.authenticate(key)
        except (AuthenticationError, PermissionDeniedError):
            raise AuthenticationError(REFUSED) from None
        credential = tenant_credential(principal) if isinstance(principal, TenantPrincipal) \
            else self.authenticator.platform_fingerprint()
        if not may_use_console(principal) or credential is None:
            raise AuthenticationError(REFUSED)
        await self.store.discard(previous_id)
        session_id, session = await self.store.create(principal, credential)
        return session_id, session, principal

    async def sign_out(self, session: ConsoleSession) -> None:
        """End this session."""
        await self.store.end(session)

    async def end_all(self, session: ConsoleSession) -> int:
        """End every session of this session's key, this one included."""
        return await self.store.end_all(session.credential)

    def describe(self, session: ConsoleSession, principal: Principal) -> ConsoleSessionOut:
        """Who is signed in, for the page."""
        tenant = principal if isinstance(principal, TenantPrincipal) else None
        return ConsoleSessionOut(
            kind=session.kind, tenant_id=tenant.tenant_id if tenant else None,
            tenant_slug=tenant.tenant_slug if tenant else None,
            key_id=tenant.key_id if tenant else None,
            scopes=sorted(tenant.scopes) if tenant else [],
            csrf_token=session.csrf_token,
            expires_at=datetime.fromtimestamp(self.store.expires_at(session), UTC),
            idle_timeout_s=self.store.idle_s)
