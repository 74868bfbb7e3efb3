"""``/console/session``: sign in (a key for a session cookie), who is signed in, sign
out, and end every session of the key. The cookie and the guards are
app/http/sessions.py's; the rules are the service's (service.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from pydantic import ValidationError

from app.domain.console.schemas import ConsoleSessionOut, SessionsEnded, SignIn
from app.domain.console.service import ConsoleSessions
from app.http.openapi import problems
from app.http.problems import validation_failed
from app.http.sessions import (
    COOKIE,
    FORM,
    cleared_cookie,
    console_session,
    session_cookie,
    session_of,
)
from app.settings import Settings

AnyRequest = Request[Any, Any, Any]
# OpenAPI: the session cookie, not a bearer key
SESSION: list[dict[str, list[str]]] = [{"consoleSession": []}]
_KEY_SCHEMA = Schema(type=OpenAPIType.OBJECT, required=["key"], properties={
    "key": Schema(type=OpenAPIType.STRING, min_length=1, max_length=1024,
                  description="A tenant key with `admin`, or the operator key")})


@dataclass
class SignInOperation(Operation):
    """The sign-in's body, which is read by hand: JSON or a form, both with ``key``."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(required=True, content={
            media: OpenAPIMediaType(schema=_KEY_SCHEMA)
            for media in ("application/json", FORM)})


async def read_key(request: AnyRequest) -> str:
    """The key a sign-in sends, as JSON or a form; a 400 that never repeats it."""
    raw: Any
    if request.content_type[0] == FORM:
        form = await request.form()
        raw = {name: form.get(name) for name in form}
    else:
        raw = await request.json()  # a 400 for malformed JSON (app/http/bodies.py)
    try:
        return SignIn.model_validate(raw).key
    except ValidationError as exc:
        raise validation_failed(request.method, request.url.path, request.url.query,
                                exc.errors(include_input=False)) from exc


def client_address(request: AnyRequest) -> str:
    """The client's address, as the server (and its trusted proxies) report it."""
    return request.client.host if request.client else "unknown"


class SessionController(Controller):
    """A browser's console session."""

    path = "/session"

    @post("/", status_code=201, summary="Sign in to the console with a key",
          operation_class=SignInOperation, security=[{}], responses=problems(400, 429),
          description="Exchanges a tenant key with `admin` (or the operator key) for a "
          "session: an HttpOnly, SameSite=Strict cookie for /console. The answer holds "
          "the CSRF token that every unsafe console request sends back (`X-CSRF-Token`). "
          "Attempts are limited per client and per key prefix (429, `Retry-After`).")
    async def sign_in(self, request: AnyRequest, console: NamedDependency[ConsoleSessions],
                      settings: NamedDependency[Settings]) -> Response[ConsoleSessionOut]:
        key = await read_key(request)
        session_id, session, principal = await console.sign_in(
            key, client_address(request), request.cookies.get(COOKIE, ""))
        return Response(console.describe(session, principal), status_code=201,
                        cookies=[session_cookie(session_id, settings.is_production)])

    @get("/", guards=[console_session], security=SESSION,
         summary="Who is signed in (and the session's CSRF token)")
    async def who(self, request: AnyRequest,
                  console: NamedDependency[ConsoleSessions]) -> ConsoleSessionOut:
        return console.describe(session_of(request), request.user)

    @delete("/", guards=[console_session], security=SESSION, summary="Sign out")
    async def sign_out(self, request: AnyRequest, console: NamedDependency[ConsoleSessions],
                       settings: NamedDependency[Settings]) -> Response[None]:
        await console.sign_out(session_of(request))
        return Response(None, status_code=204, cookies=[cleared_cookie(settings.is_production)])

    @post("/end-all", status_code=200, guards=[console_session], security=SESSION,
          summary="Sign out everywhere: end every session of this key")
    async def end_all(self, request: AnyRequest, console: NamedDependency[ConsoleSessions],
                      settings: NamedDependency[Settings]) -> Response[SessionsEnded]:
        ended = await console.end_all(session_of(request))
        return Response(SessionsEnded(ended=ended),
                        cookies=[cleared_cookie(settings.is_production)])
