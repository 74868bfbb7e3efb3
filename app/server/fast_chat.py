"""``POST /v1/chat/completions`` served outside Litestar's layers.

The chat path is the hot one: every generation passes here, and the dispatch benchmark
(bench/dispatch_overhead.py) holds what it adds to the generation server's latency to
about 2 ms. Litestar's routing, middleware stack, guard copies, signature model and
dependency injection cost about a third of the request's CPU, so the API answers this
one route itself, with the same pieces the Litestar route uses and in the same order:

1. the request id and the access log line (as ``RequestContextMiddleware``);
2. CORS for browser pages (as ``CorsMiddleware``; a preflight is an OPTIONS request,
   which Litestar still answers);
3. the API key or embed token (:func:`app.http.auth.authenticate_bearer`) and the chat
   guard (:func:`app.http.guards.chat_or_embed`);
4. the body: the size limit, JSON (:func:`app.http.bodies.decode_json`, as Litestar's
   routes), and the same validation as Litestar's, with the same error shape;
5. :func:`app.domain.chat.controllers.answer_chat`, which the Litestar route calls too;
6. errors through the same exception handlers (problem+json).

Every other method on the path goes to Litestar (405). With tracing on, the Litestar
route serves chat too, so its requests get their server spans.
``tests/integration/test_fast_chat.py`` sends the same requests through both and
compares the answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from litestar import Request, Response
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.serialization import encode_json
from litestar.types import (
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)
from pydantic import ValidationError

from app.domain.chat.controllers import answer_chat
from app.domain.chat.schemas import ChatCompletionRequest
from app.domain.chat.service import ChatService
from app.http.auth import authenticate_bearer
from app.http.bodies import decode_json
from app.http.cors import allowed_origins_of, cors_headers, error_origin_var, readable
from app.http.guards import chat_or_embed
from app.http.problems import EXCEPTION_HANDLERS, validation_failed
from app.http.request_context import log_access, request_id_from
from app.logs import request_id_var, tenant_id_var

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.datastructures import State
    from litestar.handlers import HTTPRouteHandler

CHAT_PATH = "/v1/chat/completions"
_WANTED = frozenset({b"authorization", b"origin", b"x-request-id", b"content-length"})


def is_chat_request(scope: Any) -> bool:
    """A chat completion request (the only one served here)."""
    return bool(scope["type"] == "http" and scope["path"] == CHAT_PATH
                and scope["method"] == "POST")


class ChatEndpoint:
    """The ASGI handler of ``POST /v1/chat/completions`` for one app."""

    def __init__(self, app: Litestar, chat: Callable[[State], ChatService],
                 max_body_bytes: int) -> None:
        self.app = app
        self.chat = chat  # the chat service, from the app's state
        self.max_body_bytes = max_body_bytes
        self._route: HTTPRouteHandler | None = None

    @property
    def route(self) -> HTTPRouteHandler:
        """The Litestar route handler of the path (its guards' second argument)."""
        if self._route is None:
            for route in self.app.routes:
                if route.path == CHAT_PATH:
                    self._route = route.route_handler_map["POST"][0]  # type: ignore[union-attr]
                    break
            else:
                raise RuntimeError(f"{CHAT_PATH} is not among the app's routes")
        return self._route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one chat request, however it ends."""
        started = time.perf_counter()
        wanted: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _WANTED:
                wanted.setdefault(name.decode(), value.decode("latin-1"))
        request_id = request_id_from(wanted.get("x-request-id"))
        id_token, tenant_token = request_id_var.set(request_id), tenant_id_var.set(None)
        origin = wanted.get("origin")
        allowed_anywhere = False
        status = 500
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        try:
            try:
                if origin is not None:
                    allowed_anywhere = await allowed_origins_of(scope).contains(origin)
                    error_origin_var.set(origin if allowed_anywhere else None)
                scope["user"], scope["auth"] = await authenticate_bearer(
                    self.app.state.authenticator, wanted.get("authorization"))
                await chat_or_embed(request, self.route)
                data = await self._body(receive, wanted.get("content-length"), scope)
                response = await answer_chat(request, data, self.chat(self.app.state))
            except Exception as exc:  # what Litestar's exception middleware would do
                response = _handle(request, exc)
            status = response.status_code or 200
            extra = self._extra_headers(request_id, origin, scope, status, allowed_anywhere)
            if type(response) is Response and response.media_type is None:  # JSON
                await _send_json(send, response, extra)
            else:  # a stream, or an error's problem+json: Litestar's own rendering
                await response.to_asgi_response(None, request)(
                    scope, receive, _adding(send, extra))
        finally:
            log_access(scope, status, started)
            error_origin_var.set(None)
            request_id_var.reset(id_token)
            tenant_id_var.reset(tenant_token)

    async def _body(self, receive: Receive, announced: str | None,
                    scope: Scope) -> ChatCompletionRequest:
        """The request body, read within the size limit and validated."""
        if announced is not None and announced.isdigit() and int(announced) > \
                self.max_body_bytes:
            raise RequestEntityTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message: Any = await receive()
            if message["type"] == "http.disconnect":
                raise ClientException("client disconnected prematurely")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
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
            return ChatCompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise validation_failed("POST", scope["path"],
                                    scope.get("query_string", b"").decode("latin-1"),
                                    exc.errors(include_input=False)) from exc

    @staticmethod
    def _extra_headers(request_id: str, origin: str | None, scope: Scope, status: int,
                       allowed_anywhere: bool) -> dict[str, str]:
        """The request id, and for a browser page the CORS headers."""
        extra = {"x-request-id": request_id}
        if origin is not None:
            extra["vary"] = "Origin"
            if readable(origin, scope.get("user"), status, allowed_anywhere):
                extra.update({k.lower(): v for k, v in cors_headers(origin).items()})
        return extra


def _handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The app's answer to ``exc``: its nearest handler in the exception map."""
    handler = next(EXCEPTION_HANDLERS[cls] for cls in type(exc).__mro__
                   if cls in EXCEPTION_HANDLERS)  # Exception's, at the latest
    return handler(request, exc)


async def _send_json(send: Send, response: Response[Any], extra: dict[str, str]) -> None:
    body = encode_json(response.content)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.items()]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send(HTTPResponseStartEvent(type="http.response.start",
                                      status=response.status_code or 200, headers=headers))
    await send(HTTPResponseBodyEvent(type="http.response.body", body=body, more_body=False))


def _adding(send: Send, extra: dict[str, str]) -> Send:
    """``send``, adding ``extra`` headers (those the response lacks) to its start."""
    async def send_with(message: Message) -> None:
        if message["type"] == "http.response.start":
            have = {bytes(k).lower() for k, _ in message["headers"]}
            message["headers"] = [*message["headers"], *(
                (k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()
                if k.encode("latin-1") not in have)]
        await send(message)
    return send_with
