"""Unauthenticated floods do not hold the database pool: hundreds of concurrent requests
with bogus keys cost one lookup per key (refusals are remembered briefly, concurrent
lookups of one key share a query) while a real tenant is served without a 503; a flood
of ``/readyz`` probes shares one check a second. Pool checkouts are counted on the real
PostgreSQL engine; the app is served over HTTP so the requests really are concurrent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class PoolUse:
    """Connections taken from the app's database pool, and the most in use at once."""

    checkouts: int = 0
    in_use: int = 0
    peak: int = 0


@contextmanager
def pool_use(app: Litestar) -> Iterator[PoolUse]:
    """Watches the app's database pool meanwhile."""
    pool = app.state.db.engine.sync_engine.pool
    use = PoolUse()

    def out(*_: Any) -> None:
        use.checkouts += 1
        use.in_use += 1
        use.peak = max(use.peak, use.in_use)

    def back(*_: Any) -> None:
        use.in_use -= 1

    event.listen(pool, "checkout", out)
    event.listen(pool, "checkin", back)
    try:
        yield use
    finally:
        event.remove(pool, "checkout", out)
        event.remove(pool, "checkin", back)


async def real_tenant(client: Client, admin_headers: dict[str, str],
                      http: httpx.AsyncClient) -> dict[str, str]:
    """A tenant admin's headers, its key already looked up (and cached) once."""
    tenant = await create_tenant(client, admin_headers)
    real = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    assert (await http.get("/v1/tenant/content-rules", headers=real)).status_code == 200
    return real


async def test_a_flood_of_bogus_keys_costs_one_lookup_per_key_and_no_503s(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    real = await real_tenant(client, admin_headers, http)
    bogus = [bearer(mint_key().plaintext) for _ in range(BOGUS_KEYS)]
    with pool_use(app) as use:
        answers = await asyncio.gather(*(http.get("/v1/models", headers=bogus[i % BOGUS_KEYS])
                                         for i in range(FLOOD)))
    assert {r.status_code for r in answers} == {401}
    assert use.checkouts <= BOGUS_KEYS + BACKGROUND, \
        f"{use.checkouts} checkouts for {FLOOD} requests"
    # Again, with the real tenant's requests (each one a database query) in the middle.
    flood = [http.get("/v1/models", headers=bogus[i % BOGUS_KEYS]) for i in range(FLOOD)]
    mine = [http.get("/v1/tenant/content-rules", headers=real) for _ in range(30)]
    answers = await asyncio.gather(*flood, *mine)
    assert {r.status_code for r in answers[:FLOOD]} == {401}
    assert [r.status_code for r in answers[FLOOD:]] == [200] * 30


async def test_a_flood_of_distinct_made_up_keys_holds_at_most_half_the_pool(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    real = await real_tenant(client, admin_headers, http)
    cap = max(1, app.state.settings.database.pool_size // 2)

    def made_up() -> list[Any]:
        return [http.get("/v1/models", headers=bearer(mint_key().plaintext))
                for _ in range(FLOOD)]

    with pool_use(app) as use:
        answers = await asyncio.gather(*made_up())
    assert {r.status_code for r in answers} == {401}
    # The lookups' share, plus the embedded workers' polling.
    assert use.peak <= cap + 2, f"{use.peak} connections in use at once (lookups may hold {cap})"
    # Again, with the real tenant's requests (each one a database query) in the middle.
    mine = [http.get("/v1/tenant/content-rules", headers=real) for _ in range(30)]
    answers = await asyncio.gather(*made_up(), *mine)
    assert {r.status_code for r in answers[:FLOOD]} == {401}
    assert [r.status_code for r in answers[FLOOD:]] == [200] * 30


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
    with pool_use(app) as use:
        answers = await asyncio.gather(*(http.get("/readyz") for _ in range(200)))
    assert {r.status_code for r in answers} == {200}
    assert answers[0].json()["checks"]["postgres"] == "ok"
    assert use.checkouts <= 1 + BACKGROUND, \
        f"{use.checkouts} pool checkouts for 200 readiness probes"
