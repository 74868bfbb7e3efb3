"""Key authentication: each kind of bad credential gets its own status and a clear body."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import bearer, create_key, create_tenant

Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
async def tenant(client: Client, admin_headers: dict[str, str]) -> dict[str, Any]:
    return await create_tenant(client, admin_headers, allowed_models=["smollm2"])


def assert_problem(resp: Any, status: int, code: str, says: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status
    assert body["code"] == code
    assert says in body["detail"]


async def test_missing_key_is_401(client: Client) -> None:
    resp = await client.get("/v1/models")
    assert_problem(resp, 401, "unauthenticated", "missing API key")
    assert resp.headers["www-authenticate"] == "Bearer"


async def test_non_bearer_scheme_is_401(client: Client) -> None:
    resp = await client.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_problem(resp, 401, "unauthenticated", "Bearer <key>")


async def test_malformed_key_is_401(client: Client) -> None:
    resp = await client.get("/v1/models", headers=bearer("not-a-key"))
    assert_problem(resp, 401, "unauthenticated", "malformed API key")


async def test_wrong_secret_is_401(
    client: Client, admin_headers: dict[str, str], tenant: dict[str, Any]
) -> None:
    key = (await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"]
    tampered = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert_problem(await client.get("/v1/models", headers=bearer(tampered)),
                   401, "unauthenticated", "invalid API key")
    unknown = "trk_" + "a" * 12 + "_" + "b" * 43
    assert_problem(await client.get("/v1/models", headers=bearer(unknown)),
                   401, "unauthenticated", "invalid API key")


async def test_valid_key_works_and_records_use(
    client: Client, admin_headers: dict[str, str], tenant: dict[str, Any]
) -> None:
    created = await create_key(client, admin_headers, tenant["id"], ["chat"])
    assert created["last_used_at"] is None
    resp = await client.get("/v1/models", headers=bearer(created["key"]))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"object": "list", "data": [
        {"id": "smollm2", "object": "model", "created": 0, "owned_by": "tenantrag"}]}
    keys = (await client.get(f"/admin/tenants/{tenant['id']}/keys", headers=admin_headers)).json()
    mine = next(k for k in keys["data"] if k["id"] == created["id"])
    assert mine["last_used_at"] is not None


async def test_revoked_key_is_401_at_once(
    client: Client, admin_headers: dict[str, str], tenant: dict[str, Any]
) -> None:
    created = await create_key(client, admin_headers, tenant["id"], ["chat"])
    assert (await client.get("/v1/models", headers=bearer(created["key"]))).status_code == 200
    resp = await client.delete(
        f"/admin/tenants/{tenant['id']}/keys/{created['id']}", headers=admin_headers)
    assert resp.status_code == 200 and resp.json()["revoked_at"] is not None
    assert_problem(await client.get("/v1/models", headers=bearer(created["key"])),
                   401, "unauthenticated", "revoked")


async def test_wrong_scope_is_403(
    client: Client, admin_headers: dict[str, str], tenant: dict[str, Any]
) -> None:
    chat_only = (await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"]
    resp = await client.get("/v1/keys", headers=bearer(chat_only))
    assert_problem(resp, 403, "forbidden", "lacks the 'admin' scope")
    assert resp.json()["required_scope"] == "admin"
    ingest_only = (await create_key(client, admin_headers, tenant["id"], ["ingest"]))["key"]
    assert_problem(await client.get("/v1/models", headers=bearer(ingest_only)),
                   403, "forbidden", "lacks the 'chat' scope")


async def test_tenant_key_cannot_use_admin_routes(
    client: Client, admin_headers: dict[str, str], tenant: dict[str, Any]
) -> None:
    key = (await create_key(client, admin_headers, tenant["id"], ["admin", "chat", "ingest"]))
    resp = await client.get("/admin/tenants", headers=bearer(key["key"]))
    assert_problem(resp, 403, "forbidden", "platform operator")


async def test_platform_key_cannot_impersonate_a_tenant(client: Client,
                                                       admin_headers: dict[str, str]) -> None:
    assert_problem(await client.get("/v1/models", headers=admin_headers),
                   403, "forbidden", "needs a tenant API key")


async def test_suspended_tenant_keys_are_403_until_reactivated(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await create_tenant(client, admin_headers)
    key = (await create_key(client, admin_headers, t["id"], ["chat"]))["key"]
    assert (await client.get("/v1/tenant", headers=bearer(key))).status_code == 200
    resp = await client.post(f"/admin/tenants/{t['id']}/suspend", headers=admin_headers)
    assert resp.status_code == 200 and resp.json()["status"] == "suspended"
    assert_problem(await client.get("/v1/tenant", headers=bearer(key)),
                   403, "tenant_suspended", "suspended")
    await client.post(f"/admin/tenants/{t['id']}/activate", headers=admin_headers)
    assert (await client.get("/v1/tenant", headers=bearer(key))).status_code == 200


async def test_whoami_reports_key_and_tenant(
    client: Client, admin_headers: dict[str, str], tenant: dict[str, Any]
) -> None:
    key = await create_key(client, admin_headers, tenant["id"], ["ingest", "chat"])
    body = (await client.get("/v1/tenant", headers=bearer(key["key"]))).json()
    assert body["tenant_id"] == tenant["id"]
    assert body["tenant_slug"] == tenant["slug"]
    assert body["key_id"] == key["id"]
    assert body["scopes"] == ["chat", "ingest"]
