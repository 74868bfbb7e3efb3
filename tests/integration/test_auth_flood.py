"""Unauthenticated floods do not hold the database pool: hundreds of concurrent requests
with bogus keys cost one lookup per key (refusals are remembered briefly, concurrent
lookups of one key share a query) while a real tenant is served without a 503; a flood
of ``/readyz`` probes shares one check a second. Pool checkouts are counted on the real
PostgreSQL engine; the app is served over HTTP so the requests really are concurrent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import event

from app.auth.keys import mint_key
from tests.support import bearer, concurrent_client, create_key, create_tenant, served_over_http

Client = AsyncTestClient[Litestar]
BOGUS_KEYS, FLOOD = 3, 300
BACKGROUND = 15  # the embedded workers' own polling may take connections meanwhile


@pytest.fixture(scope="module")
async def http(app: Litestar, client: Client) -> AsyncIterator[httpx.AsyncClient]:
    async with served_over_http(app, client) as url, concurrent_client(url) as c:
        yield c


@contextmanager
def checkouts(app: Litestar) -> Iterator[list[int]]:
    """Counts connections taken from the app's database pool meanwhile."""
    seen: list[int] = []
    pool = app.state.db.engine.sync_engine.pool

    def count(*_: Any) -> None:
        seen.append(1)

    event.listen(pool, "checkout", count)
    try:
        yield seen
    finally:
        event.remove(pool, "checkout", count)


async def test_a_flood_of_bogus_keys_costs_one_lookup_per_key_and_no_503s(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    tenant = await create_tenant(client, admin_headers)
    real = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    assert (await http.get("/v1/tenant/content-rules", headers=real)).status_code == 200
    bogus = [bearer(mint_key().plaintext) for _ in range(BOGUS_KEYS)]
    with checkouts(app) as taken:
        answers = await asyncio.gather(*(http.get("/v1/models", headers=bogus[i % BOGUS_KEYS])
                                         for i in range(FLOOD)))
    assert {r.status_code for r in answers} == {401}
    assert len(taken) <= BOGUS_KEYS + BACKGROUND, f"{len(taken)} checkouts for {FLOOD} requests"
    # Again, with the real tenant's requests (each one a database query) in the middle.
    flood = [http.get("/v1/models", headers=bogus[i % BOGUS_KEYS]) for i in range(FLOOD)]
    mine = [http.get("/v1/tenant/content-rules", headers=real) for _ in range(30)]
    answers = await asyncio.gather(*flood, *mine)
    assert {r.status_code for r in answers[:FLOOD]} == {401}
    assert [r.status_code for r in answers[FLOOD:]] == [200] * 30


@contextmanager
def peak_in_use(app: Litestar) -> Iterator[list[int]]:
    """The most connections of the app's pool in use at once meanwhile (``[peak]``)."""
    pool = app.state.db.engine.sync_engine.pool
    now, peak = [0], [0]

    def out(*_: Any) -> None:
        now[0] += 1
        peak[0] = max(peak[0], now[0])

    def back(*_: Any) -> None:
        now[0] -= 1

    event.listen(pool, "checkout", out)
    event.listen(pool, "checkin", back)
    try:
        yield peak
    finally:
        event.remove(pool, "checkout", out)
        event.remove(pool, "checkin", back)


async def test_a_flood_of_distinct_made_up_keys_holds_at_most_half_the_pool(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    tenant = await create_tenant(client, admin_headers)
    real = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    assert (await http.get("/v1/tenant/content-rules", headers=real)).status_code == 200
    cap = max(1, app.state.settings.database.pool_size // 2)
    with peak_in_use(app) as peak:
        flood = [http.get("/v1/models", headers=bearer(mint_key().plaintext))
                 for _ in range(FLOOD)]
        mine = [http.get("/v1/tenant/content-rules", headers=real) for _ in range(30)]
        answers = await asyncio.gather(*flood, *mine)
    assert {r.status_code for r in answers[:FLOOD]} == {401}
    assert [r.status_code for r in answers[FLOOD:]] == [200] * 30
    # The lookups' share, plus the tenant's own requests and the workers' polling.
    assert peak[0] <= cap + 3, f"{peak[0]} connections in use at once (lookups may hold {cap})"


async def test_a_remembered_refusal_ends_with_the_change_and_new_keys_work_at_once(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    tenant = await create_tenant(client, admin_headers)
    key = bearer((await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"])
    await client.post(f"/admin/tenants/{tenant['id']}/suspend", headers=admin_headers)
    refused = await http.get("/v1/models", headers=key)  # the refusal is remembered...
    assert refused.json()["code"] == "tenant_suspended"
    await client.post(f"/admin/tenants/{tenant['id']}/activate", headers=admin_headers)
    assert (await http.get("/v1/models", headers=key)).status_code == 200  # ...until a change
    fresh = bearer((await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"])
    assert (await http.get("/v1/models", headers=fresh)).status_code == 200


async def test_a_flood_of_readiness_probes_shares_one_check(
    app: Litestar, http: httpx.AsyncClient,
) -> None:
    await asyncio.sleep(1.1)  # whatever an earlier probe cached has expired
    with checkouts(app) as taken:
        answers = await asyncio.gather(*(http.get("/readyz") for _ in range(200)))
    assert {r.status_code for r in answers} == {200}
    assert answers[0].json()["checks"]["postgres"] == "ok"
    assert len(taken) <= 1 + BACKGROUND, f"{len(taken)} pool checkouts for 200 readiness probes"
