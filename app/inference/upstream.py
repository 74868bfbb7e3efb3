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

from app.errors import BadRequestError, DomainError, UpstreamError, UpstreamTimeoutError
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


class Upstream:
    """An OpenAI-compatible server at ``base_url`` (ending in ``/v1``)."""

    def __init__(self, base_url: str, settings: LlmSettings,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        headers = {}
        if settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=settings.max_connections),
            transport=transport,
        )
        self._context_window = settings.context_window or None

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

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

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming chat completion."""
        return await self._post_json(f"{self.base_url}/chat/completions", body)

    async def open_stream(self, body: dict[str, Any]) -> UpstreamStream:
        """Send a streaming chat completion and wait for the response headers. Connect
        errors, timeouts and error statuses raise here, before the caller has sent
        anything to its own client (so it can answer 502/504, or try elsewhere)."""
        request = self._client.build_request("POST", f"{self.base_url}/chat/completions",
                                             json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"generation server timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"generation server unreachable: {exc}") from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise _status_error(response)
        return UpstreamStream(response)

    async def _get_json(self, url: str) -> dict[str, Any]:
        return await self._send(self._client.build_request("GET", url))

    async def _post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._send(self._client.build_request("POST", url, json=body))

    async def _send(self, request: httpx.Request) -> dict[str, Any]:
        try:
            response = await self._client.send(request)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"generation server timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"generation server unreachable: {exc}") from exc
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
