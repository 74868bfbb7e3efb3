"""One OpenAI-compatible generation endpoint (a vLLM server) over a pooled HTTP client.

The dispatch layer (pools, replicas, fair queues) builds on this: it owns *which*
endpoint; this module owns *how* to talk to one. Streams are passed through line by
line; each ``data:`` line is parsed once (the chat path needs the text and the usage).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from yarl import URL

from app.errors import (
    BadRequestError,
    DomainError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
)
from app.settings import LlmSettings

log = logging.getLogger(__name__)
DONE = "[DONE]"


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event of an upstream stream: the parsed chunk, or done."""

    chunk: dict[str, Any] | None  # None for the final [DONE]


class UpstreamStream:
    """An open streaming response: iterate its events once, then it is closed."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The parsed ``data:`` events, ending with the ``[DONE]`` marker (chunk None).
        A failure mid-stream raises UpstreamError."""
        try:
            async for raw in self._response.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    yield StreamEvent(None)
                    return
                yield StreamEvent(_decode(data))
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"generation server timed out mid-stream: {exc!r}") \
                from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise UpstreamError(f"generation server failed mid-stream: {exc!r}") from exc
        finally:
            self._response.release()  # back to the pool when fully read, else closed

    async def close(self) -> None:
        """Close without reading (the client went away before we started)."""
        self._response.close()


class HttpClient:
    """The one pooled HTTP client (aiohttp) every replica's requests go through, with
    explicit connection limits and timeouts. Its session is made on first use, on the
    event loop that uses it."""

    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session."""
        if self._session is None:
            s = self.settings
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0,
                                               keepalive_timeout=30.0, ttl_dns_cache=60),
                # sock_connect bounds reaching a server; waiting for a free pooled
                # connection is not a sign of a dead server (aiohttp's connect= is both).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s,
                                              sock_read=s.read_timeout_s),
                auto_decompress=True,
                cookie_jar=aiohttp.DummyCookieJar())  # a generation server sets none
        return self._session

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class Upstream:
    """An OpenAI-compatible server at ``base_url`` (ending in ``/v1``), over a client
    shared with the other servers (its owner closes it)."""

    def __init__(self, base_url: str, client: HttpClient, *, api_key: str | None = None,
                 context_window: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._chat_url = URL(f"{self.base_url}/chat/completions")  # parsed once
        self.root_url = self.base_url.removesuffix("/v1")
        self._client = client
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._context_window = context_window or None

    async def context_window(self, model: str) -> int:
        """The model's context window in tokens (from settings, else the server's
        ``max_model_len``; asked once)."""
        if self._context_window is None:
            body = await self._get_json(f"{self.base_url}/models")
            for card in body.get("data", []):
                if card.get("id") == model and isinstance(card.get("max_model_len"), int):
                    self._context_window = int(card["max_model_len"])
                    break
            else:
                raise UpstreamError(f"the generation server does not report a context window "
                                    f"for model {model!r}; set LLM_CONTEXT_WINDOW")
        return self._context_window

    async def count_prompt_tokens(self, model: str, messages: Sequence[dict[str, Any]]) -> int:
        """Exact prompt tokens of ``messages`` with the model's chat template (vLLM's
        ``/tokenize``)."""
        body = await self._post_json(f"{self.root_url}/tokenize", {
            "model": model, "messages": list(messages), "add_generation_prompt": True})
        count = body.get("count")
        if not isinstance(count, int):
            raise UpstreamError("the generation server's /tokenize gave no count")
        return count

    async def count_text_tokens(self, model: str, text: str) -> int:
        """Tokens of plain ``text`` (no template, no special tokens): a completion's
        length when the server reported no usage."""
        body = await self._post_json(f"{self.root_url}/tokenize", {
            "model": model, "prompt": text, "add_special_tokens": False})
        count = body.get("count")
        if not isinstance(count, int):
            raise UpstreamError("the generation server's /tokenize gave no count")
        return count

    async def probe(self, timeout_s: float) -> tuple[bool, str | None]:
        """(``/health`` answered 200, the ``/metrics`` text or None). Never raises."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        session = self._client.session
        try:
            async with session.get(f"{self.root_url}/health", headers=self._headers,
                                   timeout=timeout) as health:
                if health.status != 200:
                    return False, None
        except (aiohttp.ClientError, TimeoutError):
            return False, None
        try:
            async with session.get(f"{self.root_url}/metrics", headers=self._headers,
                                   timeout=timeout) as metrics:
                return True, await metrics.text() if metrics.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return True, None

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming chat completion."""
        return await self._post_json(self._chat_url, body)

    async def open_stream(self, body: dict[str, Any]) -> UpstreamStream:
        """Send a streaming chat completion and wait for the response headers. Connect
        errors, timeouts and error statuses raise here, before the caller has sent
        anything to its own client (so it can answer 502/504, or try elsewhere)."""
        response = await self._request("POST", self._chat_url, body)
        if response.status >= 400:
            try:
                raise _status_error(response.status, await _read(response))
            finally:
                response.close()
        return UpstreamStream(response)

    async def _get_json(self, url: str | URL) -> dict[str, Any]:
        return await self._send("GET", url, None)

    async def _post_json(self, url: str | URL, body: dict[str, Any]) -> dict[str, Any]:
        return await self._send("POST", url, body)

    async def _request(self, method: str, url: str | URL,
                       body: dict[str, Any] | None) -> aiohttp.ClientResponse:
        """Send; the response's headers are in, its body not yet read."""
        data, headers = None, self._headers
        if body is not None:
            data = _encode(body)
            headers = {**self._headers, "Content-Type": "application/json"}
        try:
            return await self._client.session.request(method, url, data=data, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamConnectError(f"generation server unreachable: {exc!r}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"generation server timed out: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"generation server failed: {exc!r}") from exc

    async def _send(self, method: str, url: str | URL,
                    body: dict[str, Any] | None) -> dict[str, Any]:
        response = await self._request(method, url, body)
        try:
            raw = await _read(response)
        finally:
            response.release()
        if response.status >= 400:
            raise _status_error(response.status, raw)
        try:
            result = _decode(raw)
        except ValueError as exc:
            raise UpstreamError("generation server answered with something other than "
                                "JSON") from exc
        if not isinstance(result, dict):
            raise UpstreamError("generation server answered with something other than JSON")
        return result


# msgspec: a few times faster than the json module for these small bodies, and its
# errors are ValueErrors, as json's are.
_encode = msgspec.json.encode
_decode = msgspec.json.decode


async def _read(response: aiohttp.ClientResponse) -> bytes:
    """The whole body; a failure while reading it is the server's."""
    try:
        return await response.read()
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"generation server timed out: {exc!r}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"generation server failed: {exc!r}") from exc


def _status_error(status: int, raw: bytes) -> DomainError:
    message = raw[:500].decode("utf-8", "replace")
    try:
        body = _decode(raw)
        message = str(body.get("error", {}).get("message") or body.get("message") or message)
    except (ValueError, AttributeError):
        pass
    log.warning("upstream answered %d: %s", status, message)
    if status in (400, 422):  # the request itself (e.g. a bad parameter)
        return BadRequestError(f"the generation server refused the request: {message}")
    return UpstreamError(f"generation server answered {status}: {message}",
                         upstream_status=status)
