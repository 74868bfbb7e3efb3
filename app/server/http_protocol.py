"""uvicorn's HTTP/1.1 protocol (httptools), sending a response's head and body in
one write.

uvicorn writes a response's status line and headers to the socket as soon as the app
sends ``http.response.start``, and the body as a second write. On loopback and in a VM,
each write is a segment that wakes the client. A small JSON answer, which is every
non-streamed chat completion, cost two wakeups. On the 2-core dev host that was about
0.15 ms of the chat path's p50 (BENCHMARKS.md).

Here the transport holds a response head until the next write, normally the body in
the same event-loop turn, and sends them together. A head with no write after it (the
start of a stream, a ``100 Continue``) goes out on the loop's next turn, so it is never
held longer than that. ``close`` sends what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"


class HeadWithBody:
    """A transport that joins a held response head to the write after it. Everything
    else is the wrapped transport's."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
            self._transport.write(data)
        elif data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now."""
        if self._held is not None:
            data, self._held = self._held, None
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over :class:`HeadWithBody` (``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))  # type: ignore[arg-type]
