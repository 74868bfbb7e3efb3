"""Fault injection for tests: a TCP proxy in front of a real server that can be cut
(connections dropped, new ones refused) and restored, as a restart or a network
partition looks to a client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to a TCP address or a unix socket."""

    def __init__(self, host: str | None = None, port: int | None = None,
                 unix_path: str | None = None) -> None:
        self.target_host, self.target_port, self.unix_path = host, port, unix_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def for_postgres(cls, url: str) -> TcpProxy:
        """A proxy to the server of a PostgreSQL URL (TCP, or a ``?host=<socket dir>``)."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        port = int(query.get("port", [parts.port or 5432])[0])
        if "host" in query and query["host"][0].startswith("/"):
            return cls(unix_path=f"{query['host'][0]}/.s.PGSQL.{port}")
        return cls(host=parts.hostname or "127.0.0.1", port=port)

    @classmethod
    def for_redis(cls, url: str) -> TcpProxy:
        """A proxy to the server of a Redis URL (``redis://host:port`` or ``unix://path``)."""
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return cls(unix_path=unquote(parts.path))
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)

    def redis_url(self, url: str) -> str:
        """``url`` (same database number) pointing at this proxy instead."""
        parts = urlsplit(url)
        db = parse_qs(parts.query).get("db", [parts.path.strip("/") or "0"])[0]
        return f"redis://127.0.0.1:{self.port}/{db}"

    def postgres_url(self, url: str) -> str:
        """``url`` pointing at this proxy instead."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{self.port}", query=""))

    async def start(self) -> None:
        """Accept and forward connections."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        try:
            if self.unix_path is not None:
                server_r, server_w = await asyncio.open_unix_connection(self.unix_path)
            else:
                server_r, server_w = await asyncio.open_connection(self.target_host,
                                                                   self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
        self._writers -= {client_w, server_w}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
