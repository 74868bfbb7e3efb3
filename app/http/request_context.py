"""Request ids and the access log.

Every HTTP request gets an id: the client's ``X-Request-Id`` when it is a valid one, else
a new one. It is echoed as ``X-Request-Id`` on the response, stamped on every log line
the request causes (with the tenant, once authentication has resolved it), and ends in
one access log line with the method, path, status and duration.
"""

from __future__ import annotations

import logging
import re
import time

from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import DomainError
from app.http.problems import status_for
from app.http.tracing import tracing_middleware
from app.ids import new_id
from app.logs import request_id_var, tenant_id_var
from app.settings import Settings

REQUEST_ID_HEADER = "x-request-id"
# The rule metering applies to the same header (app/domain/chat/controllers.py).
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")
# Probes hit these every few seconds: their lines are DEBUG, not INFO.
_PROBE_PATHS = frozenset({"/healthz", "/readyz"})
access_log = logging.getLogger("tenantrag.access")


def request_middleware(settings: Settings) -> list[DefineMiddleware]:
    """The middleware that comes before authentication: request ids and the access log,
    and OpenTelemetry tracing when configured (Litestar moves it outermost)."""
    return [DefineMiddleware(RequestContextMiddleware), *tracing_middleware(settings.tracing)]


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-Id`` if valid, else a new random id."""
    return request_id_from(Headers.from_scope(scope).get(REQUEST_ID_HEADER))


def request_id_from(given: str | None) -> str:
    """``given`` (the header's value) if it is a valid request id, else a new one."""
    if given is not None and _VALID_REQUEST_ID.fullmatch(given):
        return given
    return new_id()


class RequestContextMiddleware:
    """Sets the request id (and clears the tenant) for the request's log lines, echoes
    the id on the response, and writes the access log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one request with its id in context."""
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        id_token, tenant_token = request_id_var.set(request_id), tenant_id_var.set(None)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableScopeHeaders.from_message(message)
                if REQUEST_ID_HEADER not in headers:
                    headers.add(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Answered by the app's exception handler, outside this middleware: the ids
            # stay set for its log line and its response (app/http/problems.py).
            log_access(scope, _status_of(exc), started)
            raise
        log_access(scope, status, started)
        request_id_var.reset(id_token)
        tenant_id_var.reset(tenant_token)


def _status_of(exc: Exception) -> int:
    """The status the app's exception handlers answer ``exc`` with."""
    if isinstance(exc, DomainError):
        return status_for(exc)
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def log_access(scope: Scope, status: int, started: float) -> None:
    """The request's access log line (DEBUG for probes that passed)."""
    path = scope["path"]
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    level = logging.DEBUG if path in _PROBE_PATHS and status < 400 else logging.INFO
    method = scope.get("method", "")
    access_log.log(level, "%s %s %d %.1fms", method, path, status, duration_ms,
                   extra={"method": method, "path": path, "status": status,
                          "duration_ms": duration_ms})
