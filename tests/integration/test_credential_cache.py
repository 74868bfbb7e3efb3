"""Resolved keys are cached, yet a revocation, a suspension or a scope change is
refused at once in the process that made it and within a second in every other one
(PostgreSQL NOTIFY); a process that cannot hear PostgreSQL stops trusting its cache."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.auth.authenticator import ApiKeyAuthenticator
from app.auth.cache import CredentialCache, CredentialChangeListener
from app.auth.principal import TenantPrincipal
from app.db.models import Tier
from app.settings import Settings
from tests.fake_openai import free_port
from tests.faults import TcpProxy
from tests.support import bearer, create_key, create_tenant, start_api, wait_healthy

Client = AsyncTestClient[Litestar]


def cached_tenants(app: Litestar) -> set[uuid.UUID]:
    authenticator: ApiKeyAuthenticator = app.state.authenticator
    assert authenticator.cache is not None
    return {p.tenant_id for _, p in authenticator.cache._entries.values()}


async def test_a_cached_key_is_refused_at_once_after_revocation_or_suspension(
    app: Litestar, client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    admin = (await create_key(client, admin_headers, tenant["id"], ["admin", "chat"]))["key"]
    chat = await create_key(client, admin_headers, tenant["id"], ["chat"])
    for _ in range(3):
        assert (await client.get("/v1/models", headers=bearer(chat["key"]))).status_code == 200
    assert uuid.UUID(tenant["id"]) in cached_tenants(app)
    # The tenant's own admin revokes it: the very next request is refused.
    assert (await client.delete(f"/v1/keys/{chat['id']}",
                                headers=bearer(admin))).status_code == 200
    assert (await client.get("/v1/models", headers=bearer(chat["key"]))).status_code == 401
    # Suspending the tenant stops its other (cached) key at once too.
    assert (await client.get("/v1/models", headers=bearer(admin))).status_code == 200
    await client.post(f"/admin/tenants/{tenant['id']}/suspend", headers=admin_headers)
    resp = await client.get("/v1/models", headers=bearer(admin))
    assert resp.status_code == 403 and resp.json()["code"] == "tenant_suspended"
    await client.post(f"/admin/tenants/{tenant['id']}/activate", headers=admin_headers)
    assert (await client.get("/v1/models", headers=bearer(admin))).status_code == 200


@pytest.fixture
async def other_process(settings: Settings, tmp_path: Path) -> AsyncIterator[str]:
    """A second API process (``tenantrag serve``) on the same database."""
    port = free_port()
    log = tmp_path / "api.log"
    proc = start_api(settings, port, log, AUTH_CACHE_TTL_S="300")
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


async def refused_within(http: httpx.AsyncClient, url: str, key: str, status: int) -> float:
    """Seconds until the other process answers ``status`` for the key (at most 5)."""
    started = time.monotonic()
    while time.monotonic() - started < 5:
        if (await http.get(url, headers=bearer(key))).status_code == status:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not {status} after 5 s")


async def test_a_revocation_reaches_another_process_within_a_second(
    client: Client, admin_headers: dict[str, str], other_process: str,
) -> None:
    tenant = await create_tenant(client, admin_headers)
    keys = [await create_key(client, admin_headers, tenant["id"], ["chat"]) for _ in range(2)]
    models = f"{other_process}/v1/models"
    async with httpx.AsyncClient(timeout=10) as http:
        for key in keys:  # the other process caches both (for up to 300 s)
            for _ in range(2):
                assert (await http.get(models, headers=bearer(key["key"]))).status_code == 200
        await client.delete(f"/admin/tenants/{tenant['id']}/keys/{keys[0]['id']}",
                            headers=admin_headers)
        assert await refused_within(http, models, keys[0]["key"], 401) < 1.0
        await client.post(f"/admin/tenants/{tenant['id']}/suspend", headers=admin_headers)
        assert await refused_within(http, models, keys[1]["key"], 403) < 1.0


def principal(tenant_id: uuid.UUID) -> TenantPrincipal:
    return TenantPrincipal(tenant_id=tenant_id, tenant_slug="t", tier=Tier.pro,
                           key_id=uuid.uuid4())


async def test_the_cache_is_trusted_only_while_postgres_can_tell_it_about_changes(
    settings: Settings,
) -> None:
    url = settings.database.application_url()
    proxy = TcpProxy.for_postgres(url)
    await proxy.start()
    cache = CredentialCache(ttl_s=300)
    listener = CredentialChangeListener(
        "postgresql://" + proxy.postgres_url(url).partition("://")[2], cache)
    listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        tenant = uuid.uuid4()
        cache.put("k", principal(tenant), cache.generation)
        assert cache.get("k") is not None
        await proxy.cut()  # PostgreSQL unreachable: notifications could be missed
        deadline = time.monotonic() + 10
        while cache.listening:
            assert time.monotonic() < deadline, "the cache kept trusting itself"
            await asyncio.sleep(0.05)
        assert cache.get("k") is None
        cache.put("k", principal(tenant), cache.generation)
        assert cache.get("k") is None  # nothing is cached while deaf
        await proxy.start()
        await asyncio.wait_for(listener.connected.wait(), 20)
        cache.put("k", principal(tenant), cache.generation)
        assert cache.get("k") is not None
    finally:
        await listener.close()
        await proxy.cut()


def test_a_lookup_that_raced_a_change_is_not_cached() -> None:
    cache = CredentialCache(ttl_s=300)
    cache.listening = True
    tenant = uuid.uuid4()
    before = cache.generation  # a lookup starts...
    cache.drop_tenant(tenant)  # ...the tenant changes meanwhile...
    cache.put("k", principal(tenant), before)  # ...its (stale) answer is not kept
    assert cache.get("k") is None
    cache.put("k", principal(tenant), cache.generation)
    assert cache.get("k") is not None
    cache.drop_tenants({uuid.uuid4()})  # another tenant's change leaves it
    assert cache.get("k") is not None
    cache.drop_tenant(tenant)
    assert cache.get("k") is None
    short = CredentialCache(ttl_s=0.01)
    short.listening = True
    short.put("k", principal(tenant), short.generation)
    time.sleep(0.02)
    assert short.get("k") is None
