"""A fast fake of vLLM's OpenAI-compatible server, for routing, fairness and failover
tests and for benchmarks.

It speaks the parts of vLLM's wire format this app uses, with the same shapes (checked
against a real vLLM server by ``tests/integration/test_fake_congruence.py``):
``/v1/models`` (with ``max_model_len``), ``/v1/chat/completions`` (whole or streamed,
usage, finish reasons, vLLM's error bodies), ``/tokenize``, ``/health`` and ``/metrics``
(``vllm:num_requests_running``/``waiting``, ``vllm:kv_cache_usage_perc``).

What it does is configurable per server (:class:`FakeConfig`, changeable while it runs):
time to first token, time per token, how many requests run at once (the rest wait, as in
vLLM, and are counted in ``/metrics``), how many tokens it writes, failing with a status,
dying mid-stream, or leaving usage out. A token is one word; a prompt's tokens are its
words plus a fixed overhead per message, and ``/tokenize`` counts the same way, so usage
is predictable.

Run one with ``python -m tests.fake_openai --port 8101`` (benchmarks) or
:class:`FakeServer` (a thread with its own event loop; tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
PER_MESSAGE_TOKENS = 4  # chat-template overhead per message, like a real template
GENERATION_PROMPT_TOKENS = 3
FINGERPRINT = "vllm-fake"


@dataclass
class FakeConfig:
    """Behaviour of one fake server; tests may change fields while it runs."""

    model: str = "smollm2"
    max_model_len: int = 2048
    ttft_s: float = 0.0  # before the first token
    itl_s: float = 0.0  # between tokens
    completion_tokens: int = 8  # written per request unless max_tokens is lower
    max_running: int = 1_000_000  # beyond this, requests wait (vLLM's waiting queue)
    fail_status: int | None = None  # answer every chat request with this status
    fail_next: int = 0  # ...or only the next N requests
    die_after_tokens: int | None = None  # cut the connection mid-stream
    omit_usage: bool = False  # never report usage (even when asked)
    tokenize_fail_status: int | None = None  # answer /tokenize with this status
    # Prompt-cache accounting as vLLM's --enable-prompt-tokens-details reports it: a
    # prompt's leading whole blocks already seen with the same cache_salt are "cached".
    prompt_tokens_details: bool = True
    cache_block_tokens: int = 16


@dataclass
class FakeStats:
    """What the fake saw."""

    requests: int = 0
    completed: int = 0
    running: int = 0
    waiting: int = 0
    max_running_seen: int = 0
    tokens_reported: int = 0  # total_tokens of every usage this server reported
    tokenize_calls: int = 0  # /tokenize requests answered
    bodies: list[dict[str, Any]] = field(default_factory=list)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The fake's token count of a chat prompt (what its usage and /tokenize report)."""
    words = sum(len(str(m.get("content") or "").split()) for m in messages)
    return words + PER_MESSAGE_TOKENS * len(messages) + GENERATION_PROMPT_TOKENS


def prompt_words(messages: list[dict[str, Any]]) -> list[str]:
    """The prompt as the fake's tokens, in order (role markers included)."""
    words: list[str] = []
    for m in messages:
        words += [f"<{m.get('role')}>", *str(m.get("content") or "").split()]
    return words


class FakeOpenAI:
    """The ASGI app."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.stats = FakeStats()
        self._slots: asyncio.Semaphore | None = None
        self._slots_size = 0
        self._cached_blocks: set[tuple[str, int, int]] = set()  # (salt, length, hash)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await _respond(send, 200, b"", "text/plain")
        elif method == "GET" and path == "/metrics":
            await _respond(send, 200, self._metrics().encode(), "text/plain; version=0.0.4")
        elif method == "GET" and path == "/v1/models":
            await _json(send, 200, self._models())
        elif method == "POST" and path == "/tokenize":
            await self._tokenize(await _body(receive), send)
        elif method == "POST" and path == "/v1/chat/completions":
            await self._chat(await _body(receive), send)
        else:
            await _json(send, 404, {"detail": "Not Found"})

    def _models(self) -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{
            "id": self.config.model, "object": "model", "created": now, "owned_by": "vllm",
            "root": self.config.model, "parent": None,
            "max_model_len": self.config.max_model_len,
            "permission": [{
                "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
                "created": now, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None,
                "is_blocking": False}],
        }]}

    def _metrics(self) -> str:
        labels = f'engine="0",model_name="{self.config.model}"'
        usage = min(1.0, self.stats.running / max(1, self.config.max_running))
        return "".join([
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n",
            "# TYPE vllm:num_requests_running gauge\n",
            f"vllm:num_requests_running{{{labels}}} {float(self.stats.running)}\n",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n",
            "# TYPE vllm:num_requests_waiting gauge\n",
            f"vllm:num_requests_waiting{{{labels}}} {float(self.stats.waiting)}\n",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n",
            "# TYPE vllm:kv_cache_usage_perc gauge\n",
            f"vllm:kv_cache_usage_perc{{{labels}}} {usage}\n",
        ])

    async def _tokenize(self, body: dict[str, Any], send: Send) -> None:
        self.stats.tokenize_calls += 1
        if self.config.tokenize_fail_status is not None:
            status = self.config.tokenize_fail_status
            await _json(send, status, self._error(status, "tokenizer unavailable"))
            return
        if "messages" in body:
            count = prompt_tokens(body["messages"])
        else:
            count = len(str(body.get("prompt", "")).split())
        await _json(send, 200, {"count": count, "max_model_len": self.config.max_model_len,
                                "tokens": list(range(count)), "token_strs": None})

    def _error(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status,
                                                                  "InternalServerError")
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}

    async def _chat(self, body: dict[str, Any], send: Send) -> None:
        cfg, stats = self.config, self.stats
        stats.requests += 1
        stats.bodies.append(body)
        if len(stats.bodies) > 1000:
            del stats.bodies[:500]
        if body.get("model") != cfg.model:
            await _json(send, 404, self._error(
                404, f"The model `{body.get('model')}` does not exist. Valid aliases: "
                f"{cfg.model}.", "model"))
            return
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if max_tokens > cfg.max_model_len:
            await _json(send, 400, self._error(
                400, f"max_tokens={max_tokens} cannot be greater than max_model_len="
                f"{cfg.max_model_len}. Please request fewer output tokens.", "max_tokens"))
            return
        if cfg.fail_status is not None or cfg.fail_next > 0:
            cfg.fail_next = max(0, cfg.fail_next - 1)
            status = cfg.fail_status or 500
            await _json(send, status, self._error(status, "fake failure"))
            return
        prompt = prompt_tokens(body.get("messages") or [])
        n = min(cfg.completion_tokens, max_tokens)
        finish = "length" if n == max_tokens else "stop"
        request_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + n,
                                 "completion_tokens": n}
        details = self._cache_details(body) if cfg.prompt_tokens_details else None
        async with self._slot():
            if cfg.ttft_s:
                await asyncio.sleep(cfg.ttft_s)
            if not body.get("stream"):
                if cfg.itl_s:
                    await asyncio.sleep(cfg.itl_s * max(0, n - 1))
                text = "".join(f" w{i}" if i else f"w{i}" for i in range(n))
                result: dict[str, Any] = {
                    "id": request_id, "object": "chat.completion", "created": created,
                    "model": cfg.model,
                    "choices": [{"index": 0, "message": {
                        "role": "assistant", "content": text, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "reasoning": None}, "logprobs": None, "finish_reason": finish,
                        "stop_reason": None, "token_ids": None, "routed_experts": None}],
                    "service_tier": None, "system_fingerprint": FINGERPRINT,
                    "usage": None if cfg.omit_usage else {
                        **usage, "prompt_tokens_details": details and {
                            **details, "multimodal_tokens": None},
                        "completion_tokens_details": None},
                    "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                    "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
                await _json(send, 200, result)
                stats.completed += 1
                if not cfg.omit_usage:
                    stats.tokens_reported += usage["total_tokens"]
                return
            if details is not None:
                usage["prompt_tokens_details"] = details
            await self._stream(body, send, request_id, created, n, finish, usage)

    def _cache_details(self, body: dict[str, Any]) -> dict[str, int]:
        """Cached and newly cached prompt tokens, by whole blocks per cache_salt."""
        salt, block = str(body.get("cache_salt") or ""), self.config.cache_block_tokens
        words = prompt_words(body.get("messages") or [])
        keys = [(salt, end, hash(tuple(words[:end])))
                for end in range(block, len(words) + 1, block)]
        cached = 0
        for key in keys:
            if key not in self._cached_blocks:
                break
            cached = key[1]
        self._cached_blocks.update(keys)
        return {"cached_tokens": cached, "created_cache_tokens": len(keys) * block - cached}

    async def _stream(self, body: dict[str, Any], send: Send, request_id: str, created: int,
                      n: int, finish: str, usage: dict[str, Any]) -> None:
        cfg = self.config
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": cfg.model}
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8")]})
        first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}],
                 "prompt_token_ids": None, "prompt_text": None}
        await _event(send, first)
        options = body.get("stream_options") or {}
        usage_chunk = bool(options.get("include_usage")) and not cfg.omit_usage
        for i in range(n):
            if cfg.die_after_tokens is not None and i >= cfg.die_after_tokens:
                raise ConnectionAbortedError("fake server dies mid-stream")
            if i and cfg.itl_s:
                await asyncio.sleep(cfg.itl_s)
            choice: dict[str, Any] = {"index": 0, "delta": {"content": f" w{i}" if i else "w0"},
                                      "logprobs": None, "finish_reason": None,
                                      "token_ids": None}
            chunk = {**head, "choices": [choice]}
            if i == n - 1:
                choice = {**choice, "finish_reason": finish, "stop_reason": None}
                choice["token_ids"] = choice.pop("token_ids")
                chunk = {**head, "choices": [choice]}
                if not usage_chunk:  # vLLM puts it on the last chunk when no usage follows
                    chunk["system_fingerprint"] = FINGERPRINT
            await _event(send, chunk)
        if usage_chunk:
            await _event(send, {**head, "choices": [], "usage": usage,
                                "system_fingerprint": FINGERPRINT})
            self.stats.tokens_reported += usage["total_tokens"]
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})
        self.stats.completed += 1

    def _slot(self) -> _Slot:
        if self._slots is None or self._slots_size != self.config.max_running:
            self._slots = asyncio.Semaphore(self.config.max_running)
            self._slots_size = self.config.max_running
        return _Slot(self._slots, self.stats)


class _Slot:
    def __init__(self, semaphore: asyncio.Semaphore, stats: FakeStats) -> None:
        self._semaphore, self._stats = semaphore, stats

    async def __aenter__(self) -> None:
        self._stats.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._stats.waiting -= 1
        self._stats.running += 1
        self._stats.max_running_seen = max(self._stats.max_running_seen, self._stats.running)

    async def __aexit__(self, *exc: object) -> None:
        self._stats.running -= 1
        self._semaphore.release()


async def _body(receive: Receive) -> dict[str, Any]:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    data = b"".join(chunks)
    result: dict[str, Any] = json.loads(data) if data else {}
    return result


async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    await _respond(send, status, json.dumps(payload, separators=(",", ":")).encode(),
                   "application/json")


async def _event(send: Send, payload: dict[str, Any]) -> None:
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": data, "more_body": True})


class FakeServer:
    """A fake served by uvicorn in a thread with its own event loop; a context manager.
    ``base_url`` ends in ``/v1``. ``stop()`` closes the port (connections refused)."""

    def __init__(self, config: FakeConfig | None = None, port: int = 0) -> None:
        self.app = FakeOpenAI(config)
        self.port = port or free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> FakeConfig:
        """The live behaviour."""
        return self.app.config

    @property
    def stats(self) -> FakeStats:
        """What it saw."""
        return self.app.stats

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeServer:
        """Serve until stopped; returns once it listens."""
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning",
            lifespan="off", access_log=False, timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name=f"fake-openai-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    """Serve a fake from the command line (benchmarks run it as its own process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--completion-tokens", type=int, default=8)
    args = parser.parse_args()
    config = FakeConfig(ttft_s=args.ttft_ms / 1000, itl_s=args.itl_ms / 1000,
                        completion_tokens=args.completion_tokens)
    uvicorn.run(FakeOpenAI(config), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
