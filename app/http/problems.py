"""The one place where errors become HTTP responses (RFC 9457 problem+json)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import asyncpg
import msgspec
from asyncpg.exceptions._base import DataError as ArgumentDataError
from litestar import Request, Response
from litestar.exceptions import HTTPException, InternalServerException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DomainError,
    InvalidInputError,
    MonthlyQuotaExceededError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QueueTimeoutError,
    RateLimitedError,
    ServiceUnavailableError,
    UnsupportedMediaError,
    UpstreamError,
    UpstreamTimeoutError,
)
from app.http.cors import cors_headers, error_origin_var
from app.logs import request_id_var

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"

STATUS_BY_ERROR: dict[type[DomainError], int] = {
    InvalidInputError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    AuthenticationError: 401,
    PermissionDeniedError: 403,
    ServiceUnavailableError: 503,
    PayloadTooLargeError: 413,
    UnsupportedMediaError: 415,
    BadRequestError: 400,
    UpstreamError: 502,
    UpstreamTimeoutError: 504,
    QueueTimeoutError: 429,
    RateLimitedError: 429,
    MonthlyQuotaExceededError: 429,
}


def problem(status: int, title: str, detail: str, code: str, **extra: Any) -> Response[Any]:
    """A problem+json response. ``error`` repeats the message in OpenAI's error shape,
    so OpenAI SDKs show it."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail,
            "code": code, **extra,
            "error": {"message": detail, "type": code, "code": code}}
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    request_id = request_id_var.get()  # also on errors answered outside the middleware
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    origin = error_origin_var.get()  # a browser page allowed to read why it failed
    if origin is not None:
        headers.update(cors_headers(origin))
    retry_after = extra.get("retry_after_s")
    if isinstance(retry_after, int | float):  # 429 and 503 tell the client when to retry
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def status_for(exc: DomainError) -> int:
    """The HTTP status of a domain error (its nearest mapped base class)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


def domain_error_handler(_: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    """Map a domain error to its status, keeping its message and machine code."""
    return problem(status_for(exc), exc.title, exc.detail, exc.code, **exc.extra)


def validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Pydantic's errors as Litestar reports them: each one's message and the dotted
    path of its field."""
    out: list[dict[str, str]] = []
    for error in errors:
        message = {"message": str(error.get("msg", "")).split(" - ", maxsplit=1)[0]}
        if error.get("loc"):
            message["key"] = ".".join(str(part) for part in error["loc"])
        out.append(message)
    return out


def validation_failed(method: str, path: str, query: str,
                      errors: Iterable[Mapping[str, Any]]) -> ValidationException:
    """A request that fails validation, as Litestar words it."""
    where = f"{path}?{query}" if query else path
    return ValidationException(detail=f"Validation failed for {method} {where}",
                               extra=validation_errors(errors))


def _misfiled(request: Request[Any, Any, Any], exc: HTTPException) -> HTTPException:
    """Litestar takes an invalid body field that shares a dependency's name (``audit``,
    ``settings``...: an unknown field a client sent) for a failing dependency and
    answers 500. It is the client's 400."""
    cause = exc.__cause__
    if type(exc) is InternalServerException and isinstance(cause, msgspec.ValidationError) \
            and isinstance(getattr(cause, "errors", None), list):
        return validation_failed(request.method, request.url.path, request.url.query,
                                 cause.errors)  # type: ignore[attr-defined]
    return exc


def _as_sent(request: Request[Any, Any, Any], errors: Any) -> Any:
    """Litestar keys a parameter's error by the handler's argument (``start``); the
    client sent it by its name (``from``)."""
    handler = request.scope.get("route_handler")
    if not isinstance(errors, list) or handler is None:
        return errors
    named = []
    for error in errors:
        if isinstance(error, dict) and error.get("source") in ("query", "header", "cookie"):
            field = handler.parsed_fn_signature.parameters.get(str(error.get("key")))
            alias = getattr(getattr(field, "kwarg_definition", None), "name", None)
            error = {**error, "key": alias} if alias else error
        named.append(error)
    return named


def http_error_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own errors (validation, 404 route, 405...) in the same shape."""
    exc = _misfiled(request, exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, ValidationException) and exc.extra:
        extra["errors"] = _as_sent(request, exc.extra)
    code = "invalid_request" if exc.status_code < 500 else "server_error"
    title = "Invalid request" if exc.status_code == 400 else exc.__class__.__name__
    return problem(exc.status_code, title, str(exc.detail), code, **extra)


def unexpected_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Never leak a stack trace: log it, answer a plain 500."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error",
                   "An unexpected error occurred; it has been logged.", "internal_error")


# What an unreachable PostgreSQL raises: a refused or dropped connection, a connect or
# pool timeout, a connection exception (SQLSTATE class 08), a server shutting down or
# starting up (57P01-57P03).
_GONE = (ConnectionError, TimeoutError, PoolTimeoutError, asyncpg.InterfaceError,
         asyncpg.PostgresConnectionError)
_GONE_STATES = ("08", "57P01", "57P02", "57P03")
# PostgreSQL stores no NUL (U+0000) in text or JSON: the client's input, not our failure.
_NUL_STATES = ("22021", "22P05")
# A value the database refuses (SQLSTATE class 22, "data exception": out of range, too
# long, invalid text) or the driver cannot send (asyncpg's DataError, an InterfaceError:
# an integer past int64, a date past year 9999, a lone surrogate): the client's input.
_DATA_STATE_CLASS = "22"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from (drivers wrap theirs)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _sqlstates(exc: BaseException) -> set[str]:
    return {str(getattr(e, "sqlstate", "") or "") for e in _causes(exc)}


def _unreachable(exc: BaseException) -> bool:
    for e in _causes(exc):
        state = str(getattr(e, "sqlstate", "") or "")
        if isinstance(e, _GONE) or state.startswith(_GONE_STATES) or (
                isinstance(e, DBAPIError) and e.connection_invalidated):
            return True
    return False


def _refused_value(exc: BaseException) -> BaseException | None:
    """The driver's or server's error when ``exc`` is about a value sent, not the link."""
    for e in _causes(exc):
        if isinstance(e, ArgumentDataError) or str(getattr(e, "sqlstate", "") or "") \
                .startswith(_DATA_STATE_CLASS):
            return e
    return None


def _data_error(request: Request[Any, Any, Any], refused: BaseException) -> Response[Any]:
    """A 400 for a value the database refused; logged, as validation should have caught it."""
    log.warning("value refused by the database on %s %s: %s: %s", request.method,
                request.url.path, type(refused).__name__, str(refused)[:300])
    detail = "the request holds a value the database cannot store"
    if isinstance(refused, asyncpg.PostgresError):  # its message names the type, not data
        detail += f": {str(refused)[:200]}"
    return problem(400, "Invalid request", detail, "invalid_request")


def backing_service_error_handler(request: Request[Any, Any, Any],
                                  exc: Exception) -> Response[Any]:
    """PostgreSQL unreachable (restarting, partitioned): a 503 the client can retry,
    not a 500; text or values it cannot store: a 400. Anything else the driver raises
    is unexpected."""
    if _sqlstates(exc) & set(_NUL_STATES):
        return problem(400, "Invalid request", "text must not contain NUL (\\u0000) characters",
                       "invalid_request")
    if (refused := _refused_value(exc)) is not None:
        return _data_error(request, refused)
    if not _unreachable(exc):
        return unexpected_error_handler(request, exc)
    log.warning("database unavailable on %s %s: %s: %s", request.method, request.url.path,
                type(exc).__name__, exc)
    return problem(503, "Service unavailable", "the database is unavailable; retry shortly",
                   "service_unavailable", retry_after_s=2)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    DomainError: domain_error_handler,
    HTTPException: http_error_handler,
    OSError: backing_service_error_handler,
    DBAPIError: backing_service_error_handler,
    PoolTimeoutError: backing_service_error_handler,
    asyncpg.InterfaceError: backing_service_error_handler,
    asyncpg.PostgresError: backing_service_error_handler,
    Exception: unexpected_error_handler,
}
