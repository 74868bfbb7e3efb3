"""The API's HTTP protocol: uvicorn's, with a response's head and body sent in one
write. What a client sees must not change: small answers, streams whose head comes
before their first event, HEAD, keep-alive, ``100 Continue``, errors. Each is checked
over real sockets, and the writes are counted on the transport."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from app.server.http_protocol import HeadWithBody, OneWriteHttpToolsProtocol

WRITES: list[list[bytes]] = []  # the writes of each connection, for the test to read


class Recording(OneWriteHttpToolsProtocol):
    """The protocol, with each connection's socket writes recorded."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        writes: list[bytes] = []
        WRITES.append(writes)
        real_write = transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            real_write(data)

        transport.write = write  # type: ignore[method-assign]
        super().connection_made(transport)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/json":
        body = b'{"ok": true}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await asyncio.sleep(0.5)  # the first event is slow: the head must not wait for it
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    elif path == "/echo":
        received = b""
        while True:
            message = await receive()
            received += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(received)).encode())]})
        await send({"type": "http.response.body", "body": received})
    elif path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    else:
        raise RuntimeError("boom")  # uvicorn answers 500


@pytest.fixture(scope="module")
async def base_url() -> AsyncIterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="critical", http=Recording))
    task = asyncio.ensure_future(server.serve())
    while not server.started:  # uvicorn sets a flag, not an event
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def test_a_small_answer_leaves_in_one_write(base_url: str) -> None:
    WRITES.clear()
    async with httpx.AsyncClient(base_url=base_url) as c:
        for _ in range(3):  # keep-alive: each answer on the same connection
            r = await c.get("/json")
            assert r.status_code == 200 and r.json() == {"ok": True}
    assert len(WRITES) == 1 and len(WRITES[0]) == 3
    assert all(w.startswith(b"HTTP/1.1 200 ") and w.endswith(b'{"ok": true}')
               for w in WRITES[0])


async def test_a_stream_head_is_not_held_for_its_first_event(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        started = time.perf_counter()
        async with c.stream("GET", "/stream") as r:
            head_after = time.perf_counter() - started
            assert r.headers["content-type"] == "text/event-stream"
            events = [line async for line in r.aiter_lines() if line]
    assert head_after < 0.4, head_after  # the first event comes at 0.5 s
    assert events == ["data: 1", "data: [DONE]"]


async def test_head_requests_empty_answers_errors_and_request_bodies(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        head = await c.head("/json")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "12"
        assert (await c.get("/empty")).status_code == 204
        assert (await c.get("/nowhere")).status_code == 500
        big = b"x" * 300_000
        echoed = await c.post("/echo", content=big)
        assert echoed.content == big
        assert (await c.get("/json")).json() == {"ok": True}  # the connection still works


async def test_100_continue_is_sent_before_the_body(base_url: str) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"hello"), 2)
        assert final.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_a_held_head_goes_out_on_close_and_other_writes_pass_through() -> None:
    class Sink:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def close(self) -> None:
            self.closed = True

        def get_extra_info(self, name: str) -> str:
            return f"info:{name}"

    sink = Sink()
    t = HeadWithBody(sink, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert sink.writes == []
    t.close()
    assert sink.writes == [b"HTTP/1.1 200 OK\r\n\r\n"] and sink.closed
    t.write(b"raw bytes")
    assert sink.writes[-1] == b"raw bytes"
    assert t.get_extra_info("peername") == "info:peername"
