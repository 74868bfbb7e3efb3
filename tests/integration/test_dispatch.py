"""Routing, fairness and failover through the chat endpoint, against fast fake vLLM
servers (``tests/fake_openai.py``; its shapes match real vLLM's, see
``test_fake_congruence.py``). Retrieval is off: this is about where requests go."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.inference.dispatcher import Dispatcher
from app.inference.pools import PoolConfig, PoolKind, PoolsConfig
from app.settings import DispatchSettings, Settings
from tests.fake_openai import FakeConfig, FakeServer, free_port, prompt_tokens
from tests.support import (
    bearer,
    concurrent_client,
    create_key,
    create_tenant,
    install_dispatcher,
    owner_rows,
    remove_dispatcher,
    served_over_http,
)

Client = AsyncTestClient[Litestar]
MODEL = "smollm2"
ROOT = Path(__file__).resolve().parents[2]
FAST = DispatchSettings(health_interval_s=0.2, health_timeout_s=1.0, breaker_cooldown_s=30)


class Fakes:
    """Fake vLLM servers started for one test."""

    def __init__(self) -> None:
        self.servers: list[FakeServer] = []

    def new(self, **config: Any) -> FakeServer:
        server = FakeServer(FakeConfig(**config)).start()
        self.servers.append(server)
        return server


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    f = Fakes()
    yield f
    for server in f.servers:
        server.stop()


@pytest.fixture(scope="module")
async def base_url(app: Litestar, client: Client) -> AsyncIterator[str]:
    """The app over real HTTP: the test client runs one request at a time, and these
    tests need many at once."""
    async with served_over_http(app, client) as url:
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with concurrent_client(base_url) as c:
        yield c


class Tenant:
    """A tenant with a chat key, asking over HTTP."""

    def __init__(self, http: httpx.AsyncClient, info: dict[str, Any], key: str) -> None:
        self.http, self.info, self.headers = http, info, bearer(key)
        self.id = uuid.UUID(info["id"])
        self.slug: str = info["slug"]

    async def ask(self, stream: bool = False, **extra: Any) -> httpx.Response:
        body = {"model": MODEL, "stream": stream, "max_tokens": 16,
                "retrieval": {"enabled": False},
                "messages": [{"role": "user", "content": "where do I go?"}], **extra}
        return await self.http.post("/v1/chat/completions", headers=self.headers, json=body)


async def new_tenant(client: Client, http: httpx.AsyncClient, admin: dict[str, str],
                     tier: str = "pro", **fields: Any) -> Tenant:
    # Limits out of the way: these tests are about routing (test_quotas is about limits).
    fields = {"rpm_limit": 10**6, "tpm_limit": 10**9, "max_concurrency": 10**4, **fields}
    info = await create_tenant(client, admin, tier=tier, **fields)
    key = (await create_key(client, admin, info["id"], ["chat"]))["key"]
    return Tenant(http, info, key)


@pytest.fixture
async def routed(app: Litestar, client: Client, settings: Settings) -> AsyncIterator[Routed]:
    r = Routed(app, client, settings)
    yield r
    await r.close()


class Routed:
    """Installs a dispatcher over given pools into the running app, for one test."""

    def __init__(self, app: Litestar, client: Client, settings: Settings) -> None:
        self.app, self.client, self.settings = app, client, settings
        self.dispatcher: Dispatcher | None = None
        self._before = app.state.dispatcher

    async def use(self, *pools: PoolConfig, dispatch: DispatchSettings = FAST) -> Dispatcher:
        await self.close()
        self.dispatcher = await install_dispatcher(
            self.app, self.client, PoolsConfig(pools=list(pools)), self.settings, dispatch)
        return self.dispatcher

    async def close(self) -> None:
        if self.dispatcher is not None:
            await remove_dispatcher(self.app, self.client, self.dispatcher)
            self.dispatcher = None
        self.app.state.dispatcher = self._before


async def tenant_favouring(server: FakeServer, d: Dispatcher, client: Client,
                           http: httpx.AsyncClient, admin: dict[str, str]) -> Tenant:
    """A new tenant whose affinity replica (rendezvous hash) is ``server``."""
    replicas = d.pools[0].replicas
    for _ in range(40):
        tenant = await new_tenant(client, http, admin)
        favourite = max(replicas, key=lambda r: r.affinity(tenant.id.bytes))
        if favourite.url == server.base_url:
            return tenant
    raise AssertionError("no tenant favoured the replica")


def pool(name: str, *servers: FakeServer, **fields: Any) -> PoolConfig:
    return PoolConfig(name=name, models=[MODEL], endpoints=[s.base_url for s in servers],
                      **fields)


def salts(server: FakeServer) -> set[str]:
    return {str(b.get("cache_salt")) for b in server.stats.bodies}


async def wait_until(condition: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def sse(resp: httpx.Response) -> list[Any]:
    events: list[Any] = []
    for line in resp.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_each_tenant_lands_on_its_dedicated_or_tier_pool_only(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    acme = await new_tenant(client, http, admin_headers, "enterprise")
    globex = await new_tenant(client, http, admin_headers, "enterprise", allow_spillover=True)
    free = await new_tenant(client, http, admin_headers, "free")
    pro = await new_tenant(client, http, admin_headers, "pro")
    f_free, f_pro, f_acme, f_globex = (fakes.new() for _ in range(4))
    d = await routed.use(
        pool("free", f_free, tiers=["free"]),
        pool("paid", f_pro, tiers=["pro", "enterprise"], priority_scheduling=True),
        pool("acme", f_acme, kind=PoolKind.dedicated, tenants=[acme.slug],
             priority_scheduling=True),
        pool("globex", f_globex, kind=PoolKind.dedicated, tenants=[str(globex.id)]))
    for tenant in (acme, globex, free, pro):
        for stream in (False, True):
            resp = await tenant.ask(stream=stream)
            assert resp.status_code == 200, resp.text
    salt = {t.slug: d.cache_salt(t.id) for t in (acme, globex, free, pro)}
    assert len(set(salt.values())) == 4  # every tenant its own prefix-cache salt
    assert salts(f_acme) == {salt[acme.slug]}
    assert salts(f_globex) == {salt[globex.slug]}  # named by id; spillover unused (room)
    assert salts(f_free) == {salt[free.slug]}
    assert salts(f_pro) == {salt[pro.slug]}
    # Priority from the tier, only where the pool runs vLLM's priority scheduling.
    assert {b.get("priority") for b in f_acme.stats.bodies} == {0}
    assert {b.get("priority") for b in f_pro.stats.bodies} == {5}
    assert all("priority" not in b for b in f_free.stats.bodies + f_globex.stats.bodies)


async def test_a_saturated_dedicated_pool_spills_over_only_when_allowed(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    acme = await new_tenant(client, http, admin_headers, "enterprise")
    other = await new_tenant(client, http, admin_headers, "enterprise")
    f_acme, f_other, f_shared = (fakes.new(ttft_s=0.4) for _ in range(3))
    await routed.use(
        pool("acme", f_acme, kind=PoolKind.dedicated, tenants=[acme.slug], max_in_flight=1),
        pool("other", f_other, kind=PoolKind.dedicated, tenants=[other.slug]),
        pool("shared", f_shared))
    results = await asyncio.gather(*(acme.ask() for _ in range(3)))
    assert [r.status_code for r in results] == [200] * 3
    assert f_acme.stats.requests == 3 and f_acme.stats.max_running_seen == 1  # waited
    assert f_shared.stats.requests == 0 and f_other.stats.requests == 0
    patch = await client.patch(f"/admin/tenants/{acme.id}", headers=admin_headers,
                               json={"allow_spillover": True})
    assert patch.status_code == 200 and patch.json()["allow_spillover"] is True
    results = await asyncio.gather(*(acme.ask() for _ in range(3)))
    assert [r.status_code for r in results] == [200] * 3
    assert f_shared.stats.requests == 2  # one slot on its own pool, the rest spilled
    assert f_other.stats.requests == 0  # never another tenant's dedicated pool


async def test_a_region_pinned_tenant_never_leaves_its_region(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    eu_tenant = await new_tenant(client, http, admin_headers, "pro", data_region="eu")
    anywhere = await new_tenant(client, http, admin_headers, "pro")
    f_eu, f_us = fakes.new(), fakes.new()
    d = await routed.use(pool("eu", f_eu, region="eu"), pool("us", f_us, region="us"))
    for _ in range(4):
        assert (await eu_tenant.ask()).status_code == 200
    assert salts(f_eu) == {d.cache_salt(eu_tenant.id)} and f_us.stats.requests == 0
    f_eu.stop()  # the region's only server goes away
    await wait_until(lambda: not d.snapshot()[0]["replicas"][0]["healthy"])
    resp = await eu_tenant.ask()
    assert resp.status_code == 503, resp.text
    assert "no healthy generation server" in resp.json()["detail"]
    assert "'eu'" in resp.json()["detail"]
    assert f_us.stats.requests == 0  # no spillover across regions
    assert (await anywhere.ask()).status_code == 200  # others are served elsewhere


async def test_connect_errors_and_5xx_retry_once_on_another_replica(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    bad, good = fakes.new(fail_status=500), fakes.new()
    d = await routed.use(pool("p", bad, good),
                         dispatch=FAST.model_copy(update={"health_interval_s": 60}))
    tenant = await tenant_favouring(bad, d, client, http, admin_headers)
    for stream in (False, True) * 4:
        resp = await tenant.ask(stream=stream)
        assert resp.status_code == 200, resp.text
    assert good.stats.completed == 8
    assert 1 <= bad.stats.requests <= 3  # then its circuit opened
    snapshot = {r["url"]: r for r in d.snapshot()[0]["replicas"]}
    assert snapshot[bad.base_url]["circuit_open"] is True
    seen = (await client.get("/admin/pools", headers=admin_headers)).json()  # operator view
    assert {r["url"]: r["circuit_open"] for r in seen[0]["replicas"]} == {
        bad.base_url: True, good.base_url: False}
    assert (await client.get("/admin/pools", headers=tenant.headers)).status_code == 403
    # Both failing: exactly two attempts, then a clear 502.
    bad2 = fakes.new(fail_status=503)
    bad.config.fail_status = 500
    await routed.use(pool("p", bad, bad2), dispatch=FAST.model_copy(
        update={"health_interval_s": 60}))
    before = bad.stats.requests + bad2.stats.requests
    resp = await tenant.ask()
    assert resp.status_code == 502, resp.text
    assert bad.stats.requests + bad2.stats.requests == before + 2


async def test_a_refused_connection_fails_over_and_marks_the_replica_down(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    gone, good = fakes.new(), fakes.new()
    d = await routed.use(pool("p", gone, good),
                         dispatch=FAST.model_copy(update={"health_interval_s": 60}))
    tenant = await tenant_favouring(gone, d, client, http, admin_headers)
    gone.stop()
    for stream in (True, False, True):
        resp = await tenant.ask(stream=stream)
        assert resp.status_code == 200, resp.text
    assert good.stats.completed == 3
    replicas = {r["url"]: r for r in d.snapshot()[0]["replicas"]}
    assert replicas[gone.base_url]["healthy"] is False


async def test_recovery_without_restart_when_a_replica_comes_back(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    tenant = await new_tenant(client, http, admin_headers)
    server = fakes.new()
    d = await routed.use(pool("p", server))
    server.stop()
    await wait_until(lambda: not d.snapshot()[0]["replicas"][0]["healthy"])
    resp = await tenant.ask()
    assert resp.status_code == 503 and resp.json()["code"] == "no_capacity"
    assert int(resp.headers["retry-after"]) >= 1
    server.start()  # same port
    await wait_until(lambda: d.snapshot()[0]["replicas"][0]["healthy"])
    assert (await tenant.ask()).status_code == 200


async def test_an_upstream_dying_mid_stream_ends_with_an_error_event_and_done(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient, settings: Settings,
) -> None:
    tenant = await new_tenant(client, http, admin_headers)
    server = fakes.new(die_after_tokens=3, completion_tokens=10)
    await routed.use(pool("p", server))
    resp = await tenant.ask(stream=True, user="u1", stream_options={"include_usage": True})
    assert resp.status_code == 200
    events = sse(resp)
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert error["error"]["code"] == "upstream_error"
    content = "".join(c["choices"][0]["delta"].get("content") or ""
                      for c in events[:-2] if c.get("choices"))
    assert content == "w0 w1 w2"
    conv_id = events[0]["conversation_id"]
    stored = await http.get(f"/v1/conversations/{conv_id}?user=u1", headers=tenant.headers)
    assert stored.json()["messages"][-1]["content"] == "w0 w1 w2"  # what was generated
    # ...and metered: one usage row, the three tokens sent counted (no usage came back).
    (row,) = await owner_rows(settings, "usage_events", str(tenant.id))
    assert row["status"] == "upstream_error" and row["completion_tokens"] == 3
    assert row["prompt_tokens"] > 0


async def test_usage_is_counted_with_tokenize_when_the_server_reports_none(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    tenant = await new_tenant(client, http, admin_headers)
    server = fakes.new(omit_usage=True, completion_tokens=5)
    await routed.use(pool("p", server))
    resp = await tenant.ask()
    assert resp.status_code == 200
    sent = server.stats.bodies[-1]["messages"]
    assert resp.json()["usage"] == {"prompt_tokens": prompt_tokens(sent),
                                    "completion_tokens": 5,
                                    "total_tokens": prompt_tokens(sent) + 5}
    resp = await tenant.ask(stream=True, stream_options={"include_usage": True})
    usage = [e for e in sse(resp) if isinstance(e, dict) and e.get("usage")]
    assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == 5
    assert usage[0]["choices"] == []


async def test_waiting_past_the_queue_timeout_is_a_429_with_retry_after(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    tenant = await new_tenant(client, http, admin_headers)
    server = fakes.new(ttft_s=1.5)
    await routed.use(pool("p", server, max_in_flight=1),
                     dispatch=FAST.model_copy(update={"queue_timeout_s": 0.3}))
    first = asyncio.create_task(tenant.ask())
    await wait_until(lambda: server.stats.running == 1)
    resp = await tenant.ask()
    assert resp.status_code == 429, resp.text
    assert resp.json()["code"] == "queue_timeout"
    assert int(resp.headers["retry-after"]) >= 1
    assert (await first).status_code == 200
    assert server.stats.requests == 1


async def test_a_client_that_disconnects_leaves_the_queue(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    tenant = await new_tenant(client, http, admin_headers)
    server = fakes.new(ttft_s=1.5)
    d = await routed.use(pool("p", server, max_in_flight=1))
    body = {"model": MODEL, "max_tokens": 8, "retrieval": {"enabled": False},
            "messages": [{"role": "user", "content": "hi"}]}
    first = asyncio.create_task(http.post("/v1/chat/completions", json=body,
                                          headers=tenant.headers))
    await wait_until(lambda: server.stats.running == 1)
    with pytest.raises(httpx.ReadTimeout):  # gives up and closes its connection
        await http.post("/v1/chat/completions", json=body, headers=tenant.headers,
                        timeout=0.4)
    await wait_until(lambda: d.snapshot()[0]["queued"] == 0, timeout=5)
    assert (await first).status_code == 200
    await asyncio.sleep(0.2)
    assert server.stats.requests == 1  # the one that left never reached the server


async def test_a_noisy_tenant_does_not_slow_a_quiet_one_beyond_1_5x(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    """50 concurrent requests from one tenant, non-stop, on a pool of 16 slots; another
    tenant's sequential requests keep their latency (p95 within 1.5x of alone): the
    flood may hold only its share of the pool (the rest stays free for others), and the
    quiet tenant's requests go ahead of the ~36 queued flood requests instead of behind
    them (first come, first served adds over 2 request times). The fake runs in its own
    process, as a real server would: its work is not on the app's interpreter."""
    noisy = await new_tenant(client, http, admin_headers, "pro")
    quiet = await new_tenant(client, http, admin_headers, "pro")
    port = free_port()
    argv = [sys.executable, "-m", "tests.fake_openai", "--port", str(port), "--ttft-ms",
            "600", "--itl-ms", "50", "--completion-tokens", "20"]
    fake = subprocess.Popen(argv, cwd=ROOT)  # noqa: ASYNC220
    try:
        await fake_ready(port, fake)
        d = await routed.use(
            PoolConfig(name="p", models=[MODEL], endpoints=[f"http://127.0.0.1:{port}/v1"],
                       max_in_flight=16),
            dispatch=FAST.model_copy(update={"queue_timeout_s": 60}))
        await measure_fairness(noisy, quiet, d)
    finally:
        fake.terminate()
        fake.wait(10)


async def fake_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(200):
            assert proc.poll() is None, "the fake server exited"
            try:
                if (await c.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the fake server did not start")


async def measure_fairness(noisy: Tenant, quiet: Tenant, d: Dispatcher) -> None:

    async def latencies(n: int) -> list[float]:
        out = []
        for _ in range(n):
            started = time.perf_counter()
            resp = await quiet.ask(stream=True, max_tokens=4)
            assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
            out.append(time.perf_counter() - started)
        return out

    solo = await latencies(40)  # 40: a p95 of 20 samples is nearly the maximum
    stop = asyncio.Event()
    noisy_done = 0

    lengths = random.Random(7)  # noqa: S311 (answers of varied length, as in real traffic)

    async def flood() -> None:
        nonlocal noisy_done
        while not stop.is_set():
            resp = await noisy.ask(stream=True, max_tokens=lengths.randint(2, 10))
            assert resp.status_code == 200, resp.text
            noisy_done += 1

    flooders = [asyncio.create_task(flood()) for _ in range(50)]
    # The flood holds its share (14 of 16 slots: DISPATCH_MAX_TENANT_SHARE 0.875), the
    # rest of it queues.
    await wait_until(lambda: d.snapshot()[0]["replicas"][0]["in_flight"] == 14
                     and d.snapshot()[0]["queued"] >= 30)
    busy = await latencies(40)
    stop.set()
    await asyncio.gather(*flooders)
    p95 = statistics.quantiles
    solo_p95, busy_p95 = p95(solo, n=20)[18], p95(busy, n=20)[18]
    assert noisy_done > 20  # the flood really ran alongside
    assert busy_p95 <= 1.5 * solo_p95, (solo_p95, busy_p95)
