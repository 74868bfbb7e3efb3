"""A pool's replica policy (``routing`` in the pools file), through the chat endpoint over
HTTP against fake vLLM servers on real sockets: ``least_latency`` sends most requests to
the fast replica of two, the default keeps today's least-loaded-with-affinity choice, and
a policy nobody wrote stops the API at start naming the setting."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.db.models import Tier
from app.embeddings import Models
from app.inference.pools import PoolsConfigError, Routing, parse_pools
from app.inference.routing import REPLICA_POLICIES, TenantRoute
from app.server.factory import create_app
from app.settings import Settings
from tests.fake_openai import FakeServer
from tests.integration import test_dispatch as dispatch
from tests.integration.test_dispatch import (
    MODEL,
    Fakes,
    Routed,
    Tenant,
    pool,
    tenant_favouring,
)

# The routing suite's fixtures: the app over real HTTP, fake servers, a dispatcher per test.
base_url, http, fakes, routed = dispatch.base_url, dispatch.http, dispatch.fakes, dispatch.routed

Client = AsyncTestClient[Litestar]
SLOW_S = 0.15  # the slow replica's time to first token; the fast one answers at once


async def rounds(tenant: Tenant, n: int = 10, at_once: int = 4) -> None:
    """``n`` rounds of ``at_once`` concurrent whole answers, each one 200."""
    for _ in range(n):
        answers = await asyncio.gather(*(tenant.ask() for _ in range(at_once)))
        assert [r.status_code for r in answers] == [200] * at_once, answers[0].text


def share(server: FakeServer, other: FakeServer) -> float:
    total = server.stats.requests + other.stats.requests
    return server.stats.requests / total


async def slow_and_fast(fakes: Fakes, routed: Routed, client: Client,
                        http: httpx.AsyncClient, admin: dict[str, str],
                        routing: str | None) -> tuple[FakeServer, FakeServer]:
    """A pool of a slow and a fast replica, asked 40 times by a tenant whose affinity
    favourite is the slow one."""
    slow, fast = fakes.new(ttft_s=SLOW_S), fakes.new()
    fields = {} if routing is None else {"routing": routing}
    d = await routed.use(pool("two", slow, fast, **fields))
    tenant = await tenant_favouring(slow, d, client, http, admin)
    await rounds(tenant)
    return slow, fast


async def test_least_latency_sends_most_requests_to_the_fast_replica(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    slow, fast = await slow_and_fast(fakes, routed, client, http, admin_headers,
                                     "least_latency")
    # Only the first round tries the slow one (nothing measured yet); then its measured
    # time is ~30x the fast one's, so 4 in flight on the fast one still finish sooner.
    assert share(fast, slow) >= 0.85, (fast.stats.requests, slow.stats.requests)


async def test_the_default_keeps_the_tenants_affinity_replica(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    slow, fast = await slow_and_fast(fakes, routed, client, http, admin_headers, None)
    # Today's rule: 4 in flight of a cap of 32 is within the affinity headroom (0.25 of
    # the cap), so the tenant's favourite takes every request, slow or not.
    assert (slow.stats.requests, fast.stats.requests) == (40, 0)


async def test_token_counts_do_not_make_a_slow_replica_look_fast(
    client: Client, admin_headers: dict[str, str], routed: Routed, fakes: Fakes,
    http: httpx.AsyncClient,
) -> None:
    # /tokenize answers in milliseconds on a replica whose answers take SLOW_S: only the
    # answers may set what least_latency expects of it.
    slow = fakes.new(ttft_s=SLOW_S)
    d = await routed.use(pool("one", slow, routing="least_latency"))
    tenant = await tenant_favouring(slow, d, client, http, admin_headers)
    await rounds(tenant, n=2, at_once=2)
    route = TenantRoute(id=tenant.id, slug=tenant.slug, tier=Tier(tenant.info["tier"]))
    for _ in range(10):  # on the app's loop, where its dispatcher lives
        ask = partial(d.count_text_tokens, route, MODEL, "how long is this")
        count = await asyncio.to_thread(client.blocking_portal.call, ask)
        assert count > 0
    measured = d.pools[0].replicas[0].mean_duration_s
    assert measured is not None and measured >= SLOW_S, measured


def test_every_routing_value_has_a_policy_and_a_bad_one_is_refused() -> None:
    assert set(REPLICA_POLICIES) == set(Routing)
    text = '[[pools]]\nname="s"\nmodels=["m"]\nendpoints=["http://h/v1"]\nrouting="fastest"'
    with pytest.raises(PoolsConfigError, match=r"routing[\s\S]*'least_loaded' or "
                                               r"'least_latency'"):
        parse_pools(text, "toml")


async def test_a_bad_routing_setting_stops_the_api_at_start(
    settings: Settings, models: Models, tmp_path: Path,
) -> None:
    bad = settings.model_copy(deep=True)
    bad.qdrant.path = tmp_path / "qdrant"
    bad.dispatch.pools = json.dumps({"pools": [{
        "name": "shared", "models": ["smollm2"], "endpoints": ["http://127.0.0.1:9/v1"],
        "routing": "fastest"}]})
    with pytest.raises(BaseException) as refused:  # the lifespan may wrap it
        async with AsyncTestClient(app=create_app(bad, models=models)):
            pass
    messages = []
    seen: BaseException | None = refused.value
    while seen is not None:
        messages.append(str(seen))
        group = getattr(seen, "exceptions", None)
        seen = group[0] if group else (seen.__cause__ or seen.__context__)
    assert any("routing" in m and "least_latency" in m and "fastest" in m
               for m in messages), messages
