"""``POST /v1/chat/completions`` is answered outside Litestar's layers (app/server/fast_chat.py)
and, with tracing on, by the Litestar route. Both must behave alike: the same requests
go through each and their answers are compared (status, the headers a client reads, the
body less its per-request ids). Real PostgreSQL and Redis; the fake vLLM server
generates."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.server.factory import Api, create_app
from app.settings import Settings, TracingSettings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import UNLIMITED, bearer, create_key, create_tenant, one_pool, routed_through

Client = AsyncTestClient[Litestar]
SITE = "https://help.fastpath.example"
READ_HEADERS = ("content-type", "www-authenticate", "retry-after", "access-control-allow-origin",
                "access-control-expose-headers", "cache-control", "x-ratelimit-limit-requests",
                "x-ratelimit-limit-tokens")
# Per request: ids, and the fake's prefix-cache count (the second of two alike finds
# its prompt cached).
VOLATILE = {"id", "created", "x-request-id", "conversation_id", "prompt_tokens_details"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=5)) as server:
        yield server


@contextlib.contextmanager
def litestar_route(app: Api) -> Iterator[None]:
    """Requests go through Litestar's own route meanwhile."""
    fast, app.fast_chat = app.fast_chat, None
    try:
        yield
    finally:
        app.fast_chat = fast


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "max_tokens": 8, "store": False,
            "retrieval": {"enabled": False},
            "messages": [{"role": "user", "content": "where is the visitor desk?"}], **extra}


def seen(resp: Any) -> dict[str, Any]:
    """What a client sees of an answer, less what differs per request."""
    headers = {h: resp.headers.get(h) for h in READ_HEADERS}
    vary = resp.headers.get("vary")
    headers["vary"] = "Origin" if vary and "origin" in vary.lower() else None
    text = resp.text
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
        body: Any = [e if e == "[DONE]" else _strip(json.loads(e)) for e in events]
    else:
        body = _strip(json.loads(text)) if text else None
    return {"status": resp.status_code, "headers": headers, "body": body}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


async def both(app: Api, client: Client, **request: Any) -> tuple[dict[str, Any], ...]:
    """The same request through the fast path, then through the Litestar route."""
    fast = seen(await client.post("/v1/chat/completions", **request))
    with litestar_route(app):
        slow = seen(await client.post("/v1/chat/completions", **request))
    return fast, slow


async def chat_key(client: Client, admin_headers: dict[str, str], scopes: list[str],
                   **fields: Any) -> tuple[dict[str, Any], str]:
    info = await create_tenant(client, admin_headers, **{**UNLIMITED, **fields})
    return info, (await create_key(client, admin_headers, info["id"], scopes))["key"]


async def test_the_fast_path_serves_chat_and_answers_like_the_litestar_route(
    app: Api, client: Client, admin_headers: dict[str, str], routed: None,
) -> None:
    assert app.fast_chat is not None  # the API as users run it
    _, key = await chat_key(client, admin_headers, ["chat"])
    _, ingest_only = await chat_key(client, admin_headers, ["ingest"])
    cases: dict[str, dict[str, Any]] = {
        "answer": {"json": chat(), "headers": bearer(key)},
        "stream": {"json": chat(stream=True, stream_options={"include_usage": True}),
                   "headers": bearer(key)},
        "no key": {"json": chat()},
        "unknown key": {"json": chat(), "headers": bearer("trk_abcdefgh_" + "x" * 30)},
        "not a bearer": {"json": chat(), "headers": {"Authorization": "Basic abc"}},
        "no chat scope": {"json": chat(), "headers": bearer(ingest_only)},
        "invalid fields": {"json": {"model": "smollm2", "max_tokens": "x", "temperature": 5,
                                    "messages": [{"role": "robot", "content": 1}]},
                           "headers": bearer(key)},
        "not an object": {"json": [1], "headers": bearer(key)},
        # Litestar took an unknown field named like one of its dependencies for a
        # failing dependency (a 500); it is the client's 400 on both.
        "unknown field named like a service": {"json": chat(chat=1, audit=[]),
                                               "headers": bearer(key)},
        "unknown model": {"json": chat(model="gpt-9"), "headers": bearer(key)},
        "bad request id": {"json": chat(), "headers": {**bearer(key), "X-Request-Id": "a b"}},
        "last message not the user's": {
            "json": chat(messages=[{"role": "assistant", "content": "hi"}]),
            "headers": bearer(key)},
    }
    for name, request in cases.items():
        fast, slow = await both(app, client, **request)
        assert fast == slow, name
    fast, _ = await both(app, client, json=chat(audit=[]), headers=bearer(key))
    assert fast["status"] == 400 and fast["body"]["errors"][0]["key"] == "audit", fast
    fast, slow = await both(app, client, json=chat(), headers=bearer(key))
    assert fast["status"] == 200 and fast["headers"]["x-ratelimit-limit-requests"] == "1000000"
    assert fast["body"]["usage"]["completion_tokens"] == 5


async def test_request_ids_are_echoed_and_bad_bodies_get_a_clear_400(
    app: Api, client: Client, admin_headers: dict[str, str], routed: None,
) -> None:
    _, key = await chat_key(client, admin_headers, ["chat"])
    resp = await client.post("/v1/chat/completions", json=chat(),
                             headers={**bearer(key), "X-Request-Id": "order-77:retry.1"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "order-77:retry.1"
    fresh = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert len(fresh.headers["x-request-id"]) == 32  # one of ours when none is sent
    for body, says in ((b"", "the request body is empty"),
                       (b"{not json", "JSON is malformed")):
        resp = await client.post("/v1/chat/completions", content=body,
                                 headers={**bearer(key), "Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        problem = resp.json()
        assert problem["code"] == "invalid_request" and says in problem["detail"], problem
        assert resp.headers["content-type"] == "application/problem+json"
        with litestar_route(app):  # Litestar's answer: a 400 too, its wording its own
            slow = await client.post("/v1/chat/completions", content=body,
                                     headers={**bearer(key), "Content-Type": "application/json"})
        assert slow.status_code == 400 and slow.json()["code"] == "invalid_request"
    wrong = await client.get("/v1/chat/completions", headers=bearer(key))
    assert wrong.status_code == 405  # other methods: Litestar's answer


async def test_limits_browsers_and_failing_servers_alike(
    app: Api, client: Client, admin_headers: dict[str, str], settings: Settings,
) -> None:
    with FakeServer(FakeConfig(completion_tokens=3)) as fake:
        async with routed_through(app, client, one_pool(fake.base_url), settings):
            # A tenant allowed one request a minute: its second is refused with Retry-After.
            async def twice() -> list[dict[str, Any]]:
                _, key = await chat_key(client, admin_headers, ["chat"], rpm_limit=1)
                answers = [seen(await client.post("/v1/chat/completions", json=chat(),
                                                  headers=bearer(key))) for _ in range(2)]
                # The wait is until the first request's second leaves the minute: 60 s,
                # or 59 when a second boundary fell between the two requests.
                refused = answers[1]
                if refused["status"] == 429:
                    wait = refused["body"]["retry_after_s"]
                    assert wait in (59, 60) and refused["headers"]["retry-after"] == str(wait)
                    refused["body"]["retry_after_s"] = refused["headers"]["retry-after"] = "~60"
                return answers
            fast_answers = await twice()
            with litestar_route(app):
                slow_answers = await twice()
            assert fast_answers == slow_answers
            assert [a["status"] for a in fast_answers] == [200, 429]
            assert fast_answers[1]["headers"]["retry-after"] == "~60"

            # A browser page with an embed token: allowed origin, another origin, preflight.
            _, key = await chat_key(client, admin_headers, ["chat", "admin"])
            put = await client.put("/v1/tenant/embed", headers=bearer(key),
                                   json={"cors_origins": [SITE]})
            assert put.status_code == 200, put.text
            kb = await client.post("/v1/knowledge-bases", json={"name": "help"},
                                   headers=bearer(key))
            minted = await client.post("/v1/embed-tokens", headers=bearer(key),
                                       json={"user": "ann",
                                             "knowledge_base_ids": [kb.json()["id"]]})
            assert minted.status_code == 201, minted.text
            token = minted.json()["token"]
            for origin in (SITE, "https://elsewhere.example"):
                fast, slow = await both(app, client, json=chat(store=True),
                                        headers={**bearer(token), "Origin": origin})
                assert fast == slow, origin
            fast, _ = await both(app, client, json=chat(store=True),
                                 headers={**bearer(token), "Origin": SITE})
            assert fast["status"] == 200
            assert fast["headers"]["access-control-allow-origin"] == SITE
            assert fast["headers"]["vary"] == "Origin"

    # The generation server failing: 502 from both, before any byte of an answer (each
    # on a dispatcher of its own: the first failure must not open the other's breaker).
    with FakeServer(FakeConfig(fail_status=500)) as failing:
        for stream in (False, True):
            answers = []
            for fast_path in (True, False):
                async with routed_through(app, client, one_pool(failing.base_url), settings):
                    with contextlib.nullcontext() if fast_path else litestar_route(app):
                        answers.append(seen(await client.post(
                            "/v1/chat/completions", json=chat(stream=stream),
                            headers=bearer(key))))
            assert answers[0] == answers[1] and answers[0]["status"] == 502, answers


def test_with_tracing_the_litestar_route_serves_chat(settings: Settings) -> None:
    traced = settings.model_copy(update={"tracing": TracingSettings(
        exporter_otlp_endpoint="http://127.0.0.1:1")})
    assert create_app(traced).fast_chat is None  # its requests get their server spans
    assert create_app(settings).fast_chat is not None
