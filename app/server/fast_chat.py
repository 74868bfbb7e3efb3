"""``POST /v1/chat/completions`` served outside Litestar's layers.

The chat path is the hot one: every generation passes here, and the dispatch benchmark
(bench/dispatch_overhead.py) holds what it adds to the generation server's latency to
about 2 ms. Litestar's routing, middleware stack, guard copies, signature model and
dependency injection cost about a third of the request's CPU, so the API answers this
one route itself: the steps of app/server/chat_pipeline.py (request id, CORS,
authentication, guard, body, answer, render), each a function the Litestar side calls
too, in the same order. ``create_app`` refuses to start when the app's middleware is
not the list those steps reproduce.

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
from litestar.serialization import encode_json
from litestar.types import (
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)

from app.domain.chat.service import ChatService
from app.http.request_context import log_access
from app.server.chat_pipeline import STEPS, ChatCall, extra_headers, handle_error, reset

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
        """Answer one chat request, however it ends: the pipeline's steps, then render."""
        started = time.perf_counter()
        wanted: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _WANTED:
                wanted.setdefault(name.decode(), value.decode("latin-1"))
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        call = ChatCall(scope, receive, request, wanted, self.route, self.chat,
                        self.max_body_bytes)
        status = 500
        try:
            try:
                for step in STEPS:
                    await step(call)
            except Exception as exc:  # what Litestar's exception middleware would do
                handle_error(call, exc)
            response = call.response
            assert response is not None  # answered, or the error's
            status = response.status_code or 200
            extra = extra_headers(call, status)
            if type(response) is Response and response.media_type is None:  # JSON
                await _send_json(send, response, extra)
            else:  # a stream, or an error's problem+json: Litestar's own rendering
                await response.to_asgi_response(None, request)(
                    scope, receive, _adding(send, extra))
        finally:
            log_access(scope, status, started)
            reset(call)


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
