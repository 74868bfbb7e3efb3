"""The chat request's steps, in order, as one list both doors follow.

``POST /v1/chat/completions`` has two doors: Litestar's route (its middleware, then the
route's guard, body and handler) and the fast door (app/server/fast_chat.py), which
runs the same steps outside Litestar's layers because the chat path is the hot one.
So that a cross-cutting change is made once, each step here calls the same app/http
functions as the Litestar side (the few lines composing them are written in both;
tests/integration/test_fast_chat.py compares the two doors' answers, headers included):

1. request id: :func:`app.http.request_context.request_id_from` (the
   ``RequestContextMiddleware``; the access log line and the echoed header at the end);
2. CORS: :func:`app.http.cors.note_origin` (the ``CorsMiddleware``; its headers at the
   end by :func:`app.http.cors.readable` and :func:`app.http.cors.cors_headers`);
3. authenticate: :func:`app.http.auth.authenticate_bearer` (the ``ApiKeyMiddleware``);
4. guard: :func:`app.http.guards.chat_or_embed` (the route's guard);
5. read body: the size limit, :func:`app.http.bodies.decode_json` and the request
   model's validation, with Litestar's error shape;
6. answer: :func:`app.domain.chat.controllers.answer_chat` (the route's handler);
7. render: the response with the request id and CORS headers; an error through
   :data:`app.http.problems.EXCEPTION_HANDLERS`.

:data:`REPRODUCED_MIDDLEWARE` names the Litestar middleware these steps stand for;
:func:`check_middleware` (called by ``create_app``) refuses to start an app whose
middleware list differs, so a middleware added to the app cannot silently miss the
fast door.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from litestar import Request, Response
from litestar.datastructures import State
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import HTTPRouteHandler
from litestar.types import Receive, Scope
from pydantic import ValidationError

from app.domain.chat.controllers import answer_chat
from app.domain.chat.schemas import ChatCompletionRequest
from app.domain.chat.service import ChatService
from app.http.auth import ApiKeyMiddleware, authenticate_bearer
from app.http.bodies import decode_json
from app.http.cors import (
    CorsMiddleware,
    cors_headers,
    error_origin_var,
    note_origin,
    readable,
)
from app.http.guards import chat_or_embed
from app.http.problems import EXCEPTION_HANDLERS, validation_failed
from app.http.request_context import RequestContextMiddleware, request_id_from
from app.logs import request_id_var, tenant_id_var

# The app's middleware, in order, that steps 1-3 reproduce (create_app checks).
REPRODUCED_MIDDLEWARE: tuple[type, ...] = (RequestContextMiddleware, CorsMiddleware,
                                           ApiKeyMiddleware)


@dataclass
class ChatCall:
    """One chat request as it goes through the steps."""

    scope: Scope
    receive: Receive
    request: Request[Any, Any, Any]
    headers: dict[str, str]  # the few the steps read, by lower-case name
    route: HTTPRouteHandler  # the Litestar route (its guard's second argument)
    chat: Callable[[State], ChatService]  # the app's chat service (503 when none)
    max_body_bytes: int
    request_id: str = ""
    origin: str | None = None
    allowed_anywhere: bool = False  # some tenant allows the origin
    data: ChatCompletionRequest | None = None
    response: Response[Any] | None = None
    tokens: list[Any] = field(default_factory=list)  # context variables to reset


async def request_id(call: ChatCall) -> None:
    """1. The request id, for the log lines and the response."""
    call.request_id = request_id_from(call.headers.get("x-request-id"))
    call.tokens = [request_id_var.set(call.request_id), tenant_id_var.set(None)]


async def cors(call: ChatCall) -> None:
    """2. A browser page's origin: may any tenant's page read errors?"""
    call.origin = call.headers.get("origin")
    if call.origin is not None:
        call.allowed_anywhere = await note_origin(call.scope, call.origin)


async def authenticate(call: ChatCall) -> None:
    """3. The key or embed token."""
    call.scope["user"], call.scope["auth"] = await authenticate_bearer(
        call.request.app.state.authenticator, call.headers.get("authorization"))


async def guard(call: ChatCall) -> None:
    """4. The chat route's guard."""
    await chat_or_embed(call.request, call.route)


async def read_body(call: ChatCall) -> None:
    """5. The body, read within the size limit and validated."""
    announced = call.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > \
            call.max_body_bytes:
        raise RequestEntityTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Any = await call.receive()
        if message["type"] == "http.disconnect":
            raise ClientException("client disconnected prematurely")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > call.max_body_bytes:
            raise RequestEntityTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if not body.strip():
        raise ClientException("the request body is empty: send a JSON chat completion "
                              "request")
    raw = decode_json(body)  # as Litestar routes do, then the model's validation
    try:
        call.data = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_failed("POST", call.scope["path"],
                                call.scope.get("query_string", b"").decode("latin-1"),
                                exc.errors(include_input=False)) from exc


async def answer(call: ChatCall) -> None:
    """6. The chat answer (the route's own handler)."""
    assert call.data is not None  # read_body ran
    call.response = await answer_chat(call.request, call.data,
                                      call.chat(call.request.app.state))


Step = Callable[[ChatCall], Awaitable[None]]
# Steps 1-6 in order; step 7 (render) is the door's, with what they left in the call.
STEPS: tuple[Step, ...] = (request_id, cors, authenticate, guard, read_body, answer)


def handle_error(call: ChatCall, exc: Exception) -> None:
    """7a. The app's answer to ``exc``: its nearest handler in the exception map."""
    handler = next(EXCEPTION_HANDLERS[cls] for cls in type(exc).__mro__
                   if cls in EXCEPTION_HANDLERS)  # Exception's, at the latest
    call.response = handler(call.request, exc)


def extra_headers(call: ChatCall, status: int) -> dict[str, str]:
    """7b. The request id, and for a browser page the CORS headers."""
    extra = {"x-request-id": call.request_id}
    if call.origin is not None:
        extra["vary"] = "Origin"
        if readable(call.origin, call.scope.get("user"), status, call.allowed_anywhere):
            extra.update({k.lower(): v for k, v in cors_headers(call.origin).items()})
    return extra


def reset(call: ChatCall) -> None:
    """After the answer: the request's context variables as they were."""
    error_origin_var.set(None)
    if call.tokens:
        id_token, tenant_token = call.tokens
        request_id_var.reset(id_token)
        tenant_id_var.reset(tenant_token)


def check_middleware(middleware: Sequence[Any]) -> None:
    """Refuse an app whose middleware is not the list the fast door reproduces."""
    classes = tuple(getattr(m, "middleware", m) for m in middleware)
    if classes == REPRODUCED_MIDDLEWARE:
        return
    unknown = [c.__name__ for c in classes if c not in REPRODUCED_MIDDLEWARE] or \
        ["(the same middleware in another order, or one missing)"]
    raise RuntimeError(
        f"the app's middleware {[c.__name__ for c in classes]} is not the list the fast "
        f"chat door reproduces {[c.__name__ for c in REPRODUCED_MIDDLEWARE]}: "
        f"{', '.join(unknown)} would not run for POST /v1/chat/completions. Add its step "
        "to app/server/chat_pipeline.py (STEPS, and REPRODUCED_MIDDLEWARE), or run chat "
        "through Litestar's route (APP_FAST_CHAT=false)")
