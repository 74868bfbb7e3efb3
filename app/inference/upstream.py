"""One OpenAI-compatible generation endpoint (a vLLM server) over a pooled HTTP client.

The dispatch layer (pools, replicas, fair queues) builds on this: it owns *which*
endpoint; this module owns *how* to talk to one. Streams are passed through line by
line; each ``data:`` line is parsed once (the chat path needs the text and the usage).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

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

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The parsed ``data:`` events, ending with the ``[DONE]`` marker (chunk None).
        A failure mid-stream raises UpstreamError."""
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == DONE:
                    yield StreamEvent(None)
                    return
                yield StreamEvent(json.loads(data))
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"generation server timed out mid-stream: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"generation server failed mid-stream: {exc}") from exc
        finally:
            await self._response.aclose()

    async def close(self) -> None:
        """Close without reading (the client went away before we started)."""
        await self._response.aclose()


def make_http_client(settings: LlmSettings) -> httpx.AsyncClient:
    """The one pooled HTTP client every replica's requests go through, with explicit
    connection limits and timeouts."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s,
                              pool=settings.connect_timeout_s),
        limits=httpx.Limits(max_connections=settings.max_connections,
                            max_keepalive_connections=settings.max_connections,
                            keepalive_expiry=30.0),
    )


class Upstream:
    """An OpenAI-compatible server at ``base_url`` (ending in ``/v1``), over a client
    shared with the other servers (its owner closes it)."""

    def __init__(self, base_url: str, client: httpx.AsyncClient, *, api_key: str | None = None,
                 context_window: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
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
        timeout = httpx.Timeout(timeout_s)
        try:
            health = await self._client.get(f"{self.root_url}/health", headers=self._headers,
                                             timeout=timeout)
        except httpx.HTTPError:
            return False, None
        if health.status_code != 200:
            return False, None
        try:
            metrics = await self._client.get(f"{self.root_url}/metrics", headers=self._headers,
                                              timeout=timeout)
        except httpx.HTTPError:
            return True, None
        return True, metrics.text if metrics.status_code == 200 else None

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming chat completion."""
        return await self._post_json(f"{self.base_url}/chat/completions", body)

    async def open_stream(self, body: dict[str, Any]) -> UpstreamStream:
        """Send a streaming chat completion and wait for the response headers. Connect
        errors, timeouts and error statuses raise here, before the caller has sent
        anything to its own client (so it can answer 502/504, or try elsewhere)."""
        request = self._client.build_request("POST", f"{self.base_url}/chat/completions",
                                             json=body, headers=self._headers)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamConnectError(f"generation server unreachable: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"generation server timed out: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"generation server failed: {exc!r}") from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise _status_error(response)
        return UpstreamStream(response)

    async def _get_json(self, url: str) -> dict[str, Any]:
        return await self._send(self._client.build_request("GET", url, headers=self._headers))

    async def _post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._send(self._client.build_request("POST", url, json=body,
                                                           headers=self._headers))

    async def _send(self, request: httpx.Request) -> dict[str, Any]:
        try:
            response = await self._client.send(request)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamConnectError(f"generation server unreachable: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"generation server timed out: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"generation server failed: {exc!r}") from exc
        if response.status_code >= 400:
            raise _status_error(response)
        result = response.json()
        if not isinstance(result, dict):
            raise UpstreamError("generation server answered with something other than JSON")
        return result


def _status_error(response: httpx.Response) -> DomainError:
    message = response.text[:500]
    try:
        body = response.json()
        message = str(body.get("error", {}).get("message") or body.get("message") or message)
    except (ValueError, AttributeError):
        pass
    log.warning("upstream answered %d: %s", response.status_code, message)
    if response.status_code in (400, 422):  # the request itself (e.g. a bad parameter)
        return BadRequestError(f"the generation server refused the request: {message}")
    return UpstreamError(f"generation server answered {response.status_code}: {message}",
                         upstream_status=response.status_code)
