"""The console's browser side of sessions: the cookie, the same-origin check and the
session guard with its CSRF check.

Routes under ``/console`` are not behind the bearer middleware (``exclude_from_auth``):
:func:`console_session` reads the session cookie instead, re-checks the key behind it
(app/auth/sessions.py), and makes its principal the request's user, so the API's own
guards and helpers (``requires_scope``, ``tenant_of``, ``actor_of``) work unchanged on
console routes. Forged requests are refused twice over: :func:`same_origin` turns away
requests another site's page made (``Origin``, ``Sec-Fetch-Site``), and every unsafe
method must echo the session's CSRF token (synchronizer token: stored in the session,
sent back in ``X-CSRF-Token`` or, from an HTML form, a ``csrf_token`` field of a
urlencoded body; multipart bodies send the header). The cookie is HttpOnly,
``SameSite=Strict``, ``Path=/console`` and ``Secure`` outside dev and test.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.handlers.base import BaseRouteHandler

from app.auth.authenticator import ApiKeyAuthenticator
from app.auth.principal import PlatformPrincipal, Principal, TenantPrincipal
from app.auth.sessions import (
    ConsoleSession,
    SessionStore,
    credential_key_id,
    may_use_console,
)
from app.errors import AuthenticationError, CsrfError, TenantSuspendedError
from app.logs import set_log_tenant

COOKIE = "tenantrag_console"
COOKIE_PATH = "/console"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM = "application/x-www-form-urlencoded"  # a multipart body sends the header instead
_DEFAULT_PORTS = {"http": "80", "https": "443"}
SIGNED_OUT = "no console session: sign in with POST /console/session"

AnyConnection = ASGIConnection[Any, Any, Any, Any]


def session_cookie(session_id: str, secure: bool) -> Cookie:
    """The cookie holding a session id: unreadable to scripts, never sent cross-site,
    only to the console's paths; a browser-session cookie (the server ends it)."""
    return Cookie(key=COOKIE, value=session_id, path=COOKIE_PATH, httponly=True,
                  secure=secure, samesite="strict")


def cleared_cookie(secure: bool) -> Cookie:
    """The same cookie, emptied and expired (signing out)."""
    return Cookie(key=COOKIE, value="", path=COOKIE_PATH, httponly=True, secure=secure,
                  samesite="strict", max_age=0, expires=0)


def _same_origin(origin: str, host: str | None) -> bool:
    """Is ``origin`` this server's, the host the browser asked for? Host and port only:
    behind a TLS proxy the browser's scheme is not the one this process sees."""
    parts = urlsplit(origin)
    if host is None or parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False
    default = f":{_DEFAULT_PORTS[parts.scheme]}"
    return parts.netloc.lower().removesuffix(default) == host.lower().removesuffix(default)


async def same_origin(connection: AnyConnection, _: BaseRouteHandler) -> None:
    """Refuse what another site's page sent: an ``Origin`` that is not this server's,
    or ``Sec-Fetch-Site`` other than ``same-origin``/``none`` (a typed URL), save a
    top-level navigation that changes nothing (its cookie is not sent cross-site)."""
    headers = connection.headers
    unsafe = connection.scope.get("method", "GET") not in SAFE_METHODS
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none") and (
            unsafe or headers.get("sec-fetch-mode") != "navigate"):
        raise CsrfError(f"the console refuses requests made by other sites' pages "
                        f"(Sec-Fetch-Site: {site})")
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, headers.get("host")):
        raise CsrfError(f"the console refuses requests made by pages on {origin}")


async def console_session(connection: AnyConnection, _: BaseRouteHandler) -> None:
    """A live console session: its principal becomes the request's user (the key is
    re-checked on every use) and the session the request's ``auth``; an unsafe method
    must carry the session's CSRF token. 401 without one."""
    store: SessionStore = connection.app.state.console_sessions
    session = await store.resolve(connection.cookies.get(COOKIE, ""))
    if session is None:
        raise AuthenticationError(SIGNED_OUT)
    if connection.scope.get("method", "GET") not in SAFE_METHODS:
        await _check_csrf(connection, session)
    principal = await _principal_of(connection.app.state.authenticator, store, session)
    connection.scope["user"] = principal
    connection.scope["auth"] = session
    set_log_tenant(principal.tenant_id if isinstance(principal, TenantPrincipal) else None)


def session_of(connection: AnyConnection) -> ConsoleSession:
    """The request's console session (:func:`console_session` guards the route)."""
    session = connection.scope.get("auth")
    if not isinstance(session, ConsoleSession):
        raise AuthenticationError(SIGNED_OUT)
    return session


async def _check_csrf(connection: AnyConnection, session: ConsoleSession) -> None:
    sent = connection.headers.get(CSRF_HEADER)
    if sent is None and isinstance(connection, Request) and \
            connection.content_type[0] == FORM:
        field = (await connection.form()).get(CSRF_FIELD)
        sent = field if isinstance(field, str) else None
    if not sent:
        raise CsrfError(f"this request needs the session's CSRF token: send it in the "
                        f"X-CSRF-Token header or a {CSRF_FIELD!r} form field")
    if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
        raise CsrfError("the CSRF token does not match this session's")


async def _principal_of(authenticator: ApiKeyAuthenticator, store: SessionStore,
                        session: ConsoleSession) -> Principal:
    """The principal the session's key resolves to now; a key that no longer may sign
    in (revoked, expired, rescoped, tenant suspended, operator key changed) ends it."""
    try:
        principal: Principal
        if session.kind == "operator":
            if session.credential != authenticator.platform_fingerprint():
                raise AuthenticationError("the operator key has changed: sign in again")
            principal = PlatformPrincipal()
        else:
            principal = await authenticator.recheck(credential_key_id(session))
            if not may_use_console(principal):
                raise AuthenticationError("this key no longer has the admin scope: sign "
                                          "in with a key that has it")
    except (AuthenticationError, TenantSuspendedError):
        await store.end(session)
        raise
    return principal
