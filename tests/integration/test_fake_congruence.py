"""The fake vLLM server (``tests/fake_openai.py``) speaks the same wire format as real
vLLM: the same requests to both give responses of the same shape (keys and value types,
recursively), the same stream structure, the same error bodies, and metrics this app
can read. If vLLM changes its format, this test fails and the fake must follow."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.inference.replica import CircuitBreaker, Replica
from app.inference.upstream import HttpClient, Upstream
from app.settings import LlmSettings
from tests.fake_openai import FakeConfig, FakeServer

MODEL = "smollm2"
MESSAGES = [{"role": "user", "content": "Say hi"}]


def shape(value: Any) -> Any:
    """Keys and value types, recursively (list items merged)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [shape(v) for v in value]
        unique = [json.loads(s) for s in sorted({json.dumps(i, sort_keys=True) for i in items})]
        return ["list", unique]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(model=MODEL, completion_tokens=5)) as server:
        yield server


@pytest.fixture(scope="module")
def both(llm_base_url: str, fake: FakeServer) -> dict[str, str]:
    return {"vllm": llm_base_url, "fake": fake.base_url}


def stream_events(client: httpx.Client, url: str, body: dict[str, Any]) -> list[Any]:
    events: list[Any] = []
    with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_parts(events: list[Any]) -> dict[str, Any]:
    """The stream's structure: first chunk (role), content chunks, the finishing chunk,
    the usage chunk, and the end marker, each by shape."""
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    with_choices = [c for c in chunks if c["choices"]]
    usage = [c for c in chunks if not c["choices"]]
    finishing = [c for c in with_choices if c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and with_choices[-1] is finishing[0]
    middle = with_choices[1:-1]
    return {
        "first": shape(with_choices[0]),
        "first_delta": with_choices[0]["choices"][0]["delta"],
        "content": shape(middle[0]) if middle else None,
        "finishing": shape(finishing[0]),
        "usage": [shape(u) for u in usage],
    }


def test_models_completion_and_tokenize_have_vllms_shapes(both: dict[str, str]) -> None:
    out: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=120) as client:
        for name, url in both.items():
            root = url.removesuffix("/v1")
            models = client.get(f"{url}/models").json()
            done = client.post(f"{url}/chat/completions", json={
                "model": MODEL, "messages": MESSAGES, "max_tokens": 5,
                "cache_salt": "s", "priority": 0}).json()
            usage = done["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert done["choices"][0]["finish_reason"] in ("stop", "length")
            out[name] = {
                "models": shape(models),
                "completion": shape(done),
                "tokenize_chat": shape(client.post(f"{root}/tokenize", json={
                    "model": MODEL, "messages": MESSAGES,
                    "add_generation_prompt": True}).json()),
                "tokenize_text": shape(client.post(f"{root}/tokenize", json={
                    "model": MODEL, "prompt": "hello world",
                    "add_special_tokens": False}).json()),
                "health": client.get(f"{root}/health").status_code,
            }
    assert out["fake"] == out["vllm"]


def test_streams_have_vllms_structure_with_and_without_usage(both: dict[str, str]) -> None:
    out: dict[str, dict[str, Any]] = {}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.Client(timeout=120) as client:
        for name, url in both.items():
            with_usage = stream_parts(stream_events(
                client, url, {**body, "stream_options": {"include_usage": True}}))
            without = stream_parts(stream_events(client, url, body))
            assert len(with_usage["usage"]) == 1 and without["usage"] == []
            out[name] = {"with_usage": with_usage, "without": without}
    assert out["fake"]["with_usage"]["first_delta"] == {"role": "assistant", "content": ""}
    assert out["fake"] == out["vllm"]


def cached_usage(client: httpx.Client, url: str, messages: list[dict[str, str]],
                 cache_salt: str, stream: bool = False) -> dict[str, Any]:
    """The usage a server reports for ``messages`` under ``cache_salt``."""
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 2,
                            "cache_salt": cache_salt}
    if not stream:
        result: dict[str, Any] = client.post(f"{url}/chat/completions",
                                             json=body).json()["usage"]
        return result
    events = stream_events(client, url, {
        **body, "stream": True, "stream_options": {"include_usage": True}})
    return next(e["usage"] for e in events[:-1] if not e["choices"])


def test_cached_prompt_tokens_are_reported_per_cache_salt_like_vllm(
    both: dict[str, str],
) -> None:
    """A long prompt sent again with the same cache_salt is partly served from the
    prefix cache (``prompt_tokens_details.cached_tokens``); with another tenant's salt
    nothing is: the salt isolates tenants' caches, on the fake as on vLLM."""
    system = "You answer questions about the handbook. " + " ".join(
        f"rule{i} applies" for i in range(300))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    seen: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=120) as client:
        for name, url in both.items():
            salt = f"tenant-a-{name}-{uuid.uuid4().hex}"
            first = cached_usage(client, url, messages, salt)
            again = cached_usage(client, url, messages, salt)
            streamed = cached_usage(client, url, messages, salt, stream=True)
            other = cached_usage(client, url, messages, f"tenant-b-{uuid.uuid4().hex}")
            assert first["prompt_tokens_details"]["cached_tokens"] == 0
            assert 0 < again["prompt_tokens_details"]["cached_tokens"] < again["prompt_tokens"]
            assert streamed["prompt_tokens_details"]["cached_tokens"] > 0
            assert other["prompt_tokens_details"]["cached_tokens"] == 0
            seen[name] = {"whole": shape(again), "streamed": shape(streamed)}
    assert seen["fake"] == seen["vllm"]


def test_errors_have_vllms_status_and_body(both: dict[str, str]) -> None:
    out: dict[str, Any] = {}
    with httpx.Client(timeout=120) as client:
        for name, url in both.items():
            unknown = client.post(f"{url}/chat/completions",
                                  json={"model": "nope", "messages": MESSAGES})
            too_long = client.post(f"{url}/chat/completions", json={
                "model": MODEL, "messages": MESSAGES, "max_tokens": 100_000})
            out[name] = [(unknown.status_code, shape(unknown.json())),
                         (too_long.status_code, shape(too_long.json()))]
            assert unknown.json()["error"]["type"] == "NotFoundError"
            assert too_long.json()["error"]["param"] == "max_tokens"
    assert out["fake"] == out["vllm"]


async def test_this_app_reads_both_servers_metrics_and_context_window(
    both: dict[str, str],
) -> None:
    client = HttpClient(LlmSettings(read_timeout_s=60))
    try:
        for url in both.values():
            upstream = Upstream(url, client)
            healthy, metrics = await upstream.probe(10)
            assert healthy and metrics is not None
            replica = Replica(pool="p", url=url, upstream=upstream, cap=4,
                              breaker=CircuitBreaker(threshold=3, cooldown_s=15))
            replica.read_metrics(metrics)
            assert replica.waiting == 0.0 and 0.0 <= replica.kv_cache_usage <= 1.0
            assert "vllm:num_requests_waiting{" in metrics
            assert "vllm:kv_cache_usage_perc{" in metrics
            assert await upstream.context_window(MODEL) == 2048
    finally:
        await client.close()
