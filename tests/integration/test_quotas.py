"""Rate limits, concurrency, token budgets and usage metering under concurrency, against
real Redis and PostgreSQL, with a fake vLLM server upstream (its reported usage is the
truth the metering must match)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.errors import RateLimitedError, ServiceUnavailableError
from app.quotas.limiter import Limits, RateLimiter, period_of
from app.quotas.scripts import BUDGET
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer, free_port
from tests.support import (
    UNLIMITED,
    bearer,
    concurrent_client,
    create_key,
    create_tenant,
    metering_done,
    one_pool,
    owner_rows,
    routed_through,
    served_over_http,
    start_api,
    wait_healthy,
)

Client = AsyncTestClient[Litestar]
MODEL = "smollm2"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=6)) as server:
        yield server


@pytest.fixture(scope="module")
async def routed(app: Litestar, client: Client, settings: Settings,
                 fake: FakeServer) -> AsyncIterator[None]:
    async with routed_through(app, client, one_pool(fake.base_url, max_in_flight=1000),
                              settings):
        yield


@pytest.fixture(scope="module")
async def base_url(app: Litestar, client: Client, routed: None) -> AsyncIterator[str]:
    async with served_over_http(app, client) as url:
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with concurrent_client(base_url) as c:
        yield c


async def chat_tenant(client: Client, admin: dict[str, str], **fields: Any) -> tuple[
        dict[str, Any], dict[str, str]]:
    info = await create_tenant(client, admin, **{**UNLIMITED, **fields})
    key = (await create_key(client, admin, info["id"], ["chat"]))["key"]
    return info, bearer(key)


def body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream, "max_tokens": 16, "store": False,
            "retrieval": {"enabled": False},
            "messages": [{"role": "user", "content": "how many days off do I get?"}], **extra}


async def usage_rows(settings: Settings, tenant_id: str) -> list[asyncpg.Record]:
    return await owner_rows(settings, "usage_events", tenant_id)


async def budget_counter(app: Litestar, tenant_id: str) -> dict[bytes, bytes]:
    """The tenant's budget counter in Redis (read on this test's own connection)."""
    await metering_done()
    limiter: RateLimiter = app.state.limiter
    key = limiter.keys(uuid.UUID(tenant_id), "", period_of(datetime.now(UTC)))[BUDGET]
    async with aioredis.Redis.from_url(app.state.settings.redis.url) as r:
        result = await r.hgetall(key)
    return {_b(k): _b(v) for k, v in result.items()}


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


async def test_a_small_budget_holds_under_200_concurrent_requests_and_meters_exactly(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, monthly_token_budget=5000)
    before = fake.stats.tokens_reported
    results = await asyncio.gather(*(
        http.post("/v1/chat/completions", headers=headers, json=body(stream=i % 2 == 1))
        for i in range(200)))
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429} and codes.count(200) > 0 and codes.count(429) > 0
    refused = [r.json() for r in results if r.status_code == 429]
    assert {r["code"] for r in refused} == {"budget_exhausted"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in results if r.status_code == 429)
    rows = await usage_rows(settings, info["id"])
    metered = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert len(rows) == codes.count(200)
    assert metered == fake.stats.tokens_reported - before  # the engine's own counts
    assert metered <= 5000  # never over: reservations cap what is admitted
    counter = await budget_counter(app, info["id"])
    assert int(counter[b"used"]) == metered and int(counter[b"reserved"]) == 0


async def test_concurrency_limit_and_rate_limit_headers(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient, fake: FakeServer,
) -> None:
    _, headers = await chat_tenant(client, admin_headers, max_concurrency=2, rpm_limit=100)
    fake.config.ttft_s = 0.5
    try:
        results = await asyncio.gather(*(
            http.post("/v1/chat/completions", headers=headers, json=body())
            for _ in range(5)))
    finally:
        fake.config.ttft_s = 0.0
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) == 2 and len(refused) == 3
    assert {r.json()["code"] for r in refused} == {"concurrency_limited"}
    assert ok[0].headers["x-ratelimit-limit-requests"] == "100"
    assert int(ok[0].headers["x-ratelimit-remaining-requests"]) in (98, 99)
    assert ok[0].headers["x-ratelimit-reset-requests"].endswith("s")
    # The slots are free again once the requests end.
    assert (await http.post("/v1/chat/completions", headers=headers,
                            json=body())).status_code == 200


async def test_a_clients_next_request_never_finds_its_finished_one_holding_a_slot(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient, settings: Settings,
) -> None:
    # Requests are settled behind their answers: back to back at a concurrency limit of
    # one, none is refused.
    _, headers = await chat_tenant(client, admin_headers, max_concurrency=1)
    statuses = [(await http.post("/v1/chat/completions", headers=headers,
                                 json=body())).status_code for _ in range(30)]
    assert statuses == [200] * 30

    # How: a refusal while the tenant's settlements are under way waits for them and
    # asks again (here a settlement made slow on purpose, against real Redis).
    async with aioredis.Redis.from_url(settings.redis.url or "") as r:
        limiter = RateLimiter(r, namespace=f"test-{uuid.uuid4().hex[:8]}")
        tenant, limits = uuid.uuid4(), Limits(concurrency=1, tpm=100)

        async def no_usage(_: str) -> int:
            return 0

        first = await limiter.admit(tenant, "", limits, 60, no_usage)

        async def slow_settle() -> None:
            await asyncio.sleep(0.2)
            await limiter.settle(first, 10)

        with pytest.raises(RateLimitedError):  # nothing under way: refused at once
            await limiter.admit(tenant, "", limits, 60, no_usage)
        settling = asyncio.ensure_future(slow_settle())
        limiter.settling(first, settling)
        second = await limiter.admit(tenant, "", limits, 60, no_usage)  # after it
        assert settling.done() and second.lease != first.lease
        await limiter.settle(second, 10)


async def test_a_process_out_of_redis_connections_says_it_is_busy(settings: Settings) -> None:
    # Overload, not an outage: a clear 503 to retry, and never admitted unchecked (even
    # with fail-open, which is for Redis being down).
    pool = aioredis.BlockingConnectionPool.from_url(settings.redis.url or "",
                                                    max_connections=1, timeout=0.1)
    async with aioredis.Redis(connection_pool=pool) as r:
        limiter = RateLimiter(r, namespace=f"test-{uuid.uuid4().hex[:8]}", fail_open=True)
        held = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            with pytest.raises(ServiceUnavailableError, match="overloaded") as refused:
                await limiter.admit(uuid.uuid4(), "", Limits(rpm=10), 1, _no_usage)
        finally:
            await pool.release(held)
        assert refused.value.extra["retry_after_s"] == 1
        ticket = await limiter.admit(uuid.uuid4(), "", Limits(rpm=10), 1, _no_usage)
        assert ticket.headers["x-ratelimit-limit-requests"] == "10"  # a connection: admitted


async def _no_usage(_: str) -> int:
    return 0


async def test_per_end_user_limits(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    _, headers = await chat_tenant(client, admin_headers, user_rpm_limit=2)
    for _ in range(2):
        ok = await http.post("/v1/chat/completions", headers=headers, json=body(user="ann"))
        assert ok.status_code == 200
    refused = await http.post("/v1/chat/completions", headers=headers, json=body(user="ann"))
    assert refused.status_code == 429 and refused.json()["limit"] == "user_requests"
    other = await http.post("/v1/chat/completions", headers=headers, json=body(user="bob"))
    assert other.status_code == 200


async def test_a_request_killed_mid_stream_is_metered_and_a_replay_is_not_counted_twice(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, monthly_token_budget=10**6)
    fake.config.itl_s, fake.config.completion_tokens = 0.1, 30
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body(stream=True),
                               headers={**headers, "X-Request-Id": "killed-1"}) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 4:
                    break  # the client goes away mid-answer
        for _ in range(100):
            rows = await usage_rows(settings, info["id"])
            if rows:
                break
            await asyncio.sleep(0.1)
    finally:
        fake.config.itl_s, fake.config.completion_tokens = 0.0, 6
    assert len(rows) == 1
    row = rows[0]
    assert row["request_id"] == "killed-1" and row["status"] == "client_closed"
    assert row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] < 30
    # The same request id again: answered, but metered once.
    for _ in range(2):
        again = await http.post("/v1/chat/completions", json=body(),
                                headers={**headers, "X-Request-Id": "replayed-1"})
        assert again.status_code == 200
    rows = await usage_rows(settings, info["id"])
    assert [r["request_id"] for r in rows] == ["killed-1", "replayed-1"]
    counter = await budget_counter(app, info["id"])
    assert int(counter[b"used"]) == sum(r["prompt_tokens"] + r["completion_tokens"]
                                        for r in rows)
    bad = await http.post("/v1/chat/completions", json=body(),
                          headers={**headers, "X-Request-Id": "no spaces"})
    assert bad.status_code == 400


async def test_a_lost_budget_counter_is_rebuilt_from_metered_usage(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, monthly_token_budget=10**6)
    for _ in range(3):
        assert (await http.post("/v1/chat/completions", headers=headers,
                                json=body())).status_code == 200
    async with aioredis.Redis.from_url(settings.redis.url or "") as r:
        for key in await r.keys(f"*{info['id']}*"):
            await r.delete(key)  # as after a Redis restart without persistence
    assert (await http.post("/v1/chat/completions", headers=headers,
                            json=body())).status_code == 200
    rows = await usage_rows(settings, info["id"])
    counter = await budget_counter(app, info["id"])
    assert int(counter[b"used"]) == sum(r["prompt_tokens"] + r["completion_tokens"]
                                        for r in rows)


async def test_redis_down_is_a_clear_503_and_recovers_without_restart(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    _, headers = await chat_tenant(client, admin_headers, rpm_limit=1000)
    working = app.state.limiter
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                   socket_connect_timeout=0.5)
    app.state.limiter = RateLimiter(dead)
    try:
        resp = await http.post("/v1/chat/completions", headers=headers, json=body())
        assert resp.status_code == 503, resp.text
        assert "rate limiter" in resp.json()["detail"] and resp.headers["retry-after"]
    finally:
        app.state.limiter = working
        await dead.aclose()
    assert (await http.post("/v1/chat/completions", headers=headers,
                            json=body())).status_code == 200


async def test_an_rpm_limit_is_exact_across_two_api_processes(
    client: Client, admin_headers: dict[str, str], settings: Settings, fake: FakeServer,
    tmp_path: Path,
) -> None:
    _, headers = await chat_tenant(client, admin_headers, rpm_limit=25)
    ports = [free_port(), free_port()]
    procs = [start_api(settings, p, tmp_path / f"api-{p}.log", LLM_BASE_URL=fake.base_url)
             for p in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            await wait_healthy(f"http://127.0.0.1:{port}", proc, tmp_path / f"api-{port}.log")
        async with httpx.AsyncClient(timeout=60) as http:
            results = await asyncio.gather(*(
                http.post(f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions",
                          headers=headers, json=body()) for i in range(80)))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
    codes = [r.status_code for r in results]
    assert codes.count(200) == 25, codes
    assert codes.count(429) == 55
    assert {r.json()["code"] for r in results if r.status_code == 429} == {"rate_limited"}


async def test_usage_reports_per_day_model_and_user_as_json_and_csv(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    info, chat_headers = await chat_tenant(client, admin_headers)
    admin_key = (await create_key(client, admin_headers, info["id"], ["admin"]))["key"]
    admin = bearer(admin_key)
    _, other_headers = await chat_tenant(client, admin_headers)
    for user in ("ann", "ann", "bob"):
        assert (await http.post("/v1/chat/completions", headers=chat_headers,
                                json=body(user=user))).status_code == 200
    assert (await http.post("/v1/chat/completions", headers=other_headers,
                            json=body(user="eve"))).status_code == 200
    await metering_done()
    by_user = (await http.get("/v1/usage?group_by=user", headers=admin)).json()
    assert [(r["key"], r["requests"]) for r in by_user["data"]] == [("ann", 2), ("bob", 1)]
    row = by_user["data"][0]
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"] > 0
    by_model = (await http.get("/v1/usage?group_by=model", headers=admin)).json()
    assert [(r["key"], r["requests"]) for r in by_model["data"]] == [(MODEL, 3)]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    by_day = (await http.get("/v1/usage", headers=admin)).json()
    assert [(r["key"], r["requests"]) for r in by_day["data"]] == [(today, 3)]
    as_csv = await http.get("/v1/usage?group_by=user&format=csv", headers=admin)
    assert as_csv.headers["content-type"].startswith("text/csv")
    lines = as_csv.text.strip().splitlines()
    assert lines[0] == ("user,requests,prompt_tokens,completion_tokens,total_tokens,"
                        "cached_tokens,errors,cost_usd,gpu_seconds")
    assert lines[1].startswith("ann,2,") and len(lines) == 3
    # A window with nothing in it; bad windows; scopes.
    empty = await http.get("/v1/usage?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z",
                           headers=admin)
    assert empty.status_code == 200 and empty.json()["data"] == []
    backwards = await http.get("/v1/usage?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
                               headers=admin)
    assert backwards.status_code == 400
    assert (await http.get("/v1/usage", headers=chat_headers)).status_code == 403
    assert (await http.get("/v1/usage?group_by=tenant", headers=admin)).status_code == 400
    # The operator sees every tenant, by slug.
    everyone = (await http.get("/admin/usage", headers=admin_headers)).json()
    slugs = {r["key"]: r["requests"] for r in everyone["data"]}
    assert slugs[info["slug"]] == 3
    assert (await http.get("/admin/usage", headers=admin)).status_code == 403
