"""Tenant API keys: shown once, stored hashed, listed, revoked; tenant admins self-serve."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.settings import Settings
from tests.support import bearer, create_key, create_tenant

Client = AsyncTestClient[Litestar]


async def test_secret_is_shown_once_and_stored_only_hashed(
    client: Client, admin_headers: dict[str, str], settings: Settings
) -> None:
    t = await create_tenant(client, admin_headers)
    created = await create_key(client, admin_headers, t["id"], ["chat", "admin"])
    assert created["key"].startswith(f"trk_{created['prefix']}_")
    listed = (await client.get(f"/admin/tenants/{t['id']}/keys", headers=admin_headers)).json()
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert "key" not in listed["data"][0]
    assert listed["data"][0]["scopes"] == ["admin", "chat"]
    engine = create_async_engine(settings.database.owner_url())
    async with engine.connect() as conn:
        dump = (await conn.execute(text("SELECT row_to_json(k)::text FROM api_keys k"))).all()
    await engine.dispose()
    secret = created["key"].rsplit("_", 1)[1]
    assert dump and not any(secret in row[0] or created["key"] in row[0] for row in dump)


async def test_tenant_admin_manages_own_keys(client: Client, admin_headers: dict[str, str]) -> None:
    t = await create_tenant(client, admin_headers)
    admin = (await create_key(client, admin_headers, t["id"], ["admin", "chat"]))["key"]
    resp = await client.post("/v1/keys", headers=bearer(admin),
                             json={"name": "chat widget", "scopes": ["chat"]})
    assert resp.status_code == 201, resp.text
    new = resp.json()
    assert new["tenant_id"] == t["id"]
    assert (await client.get("/v1/models", headers=bearer(new["key"]))).status_code == 200
    listed = (await client.get("/v1/keys", headers=bearer(admin))).json()["data"]
    names = [k["name"] for k in listed]
    assert names == ["chat widget", "test"]
    resp = await client.delete(f"/v1/keys/{new['id']}", headers=bearer(admin))
    assert resp.status_code == 200
    assert (await client.get("/v1/models", headers=bearer(new["key"]))).status_code == 401


async def test_tenant_admin_cannot_touch_other_tenants_keys(
    client: Client, admin_headers: dict[str, str]
) -> None:
    a = await create_tenant(client, admin_headers)
    b = await create_tenant(client, admin_headers)
    a_admin = (await create_key(client, admin_headers, a["id"], ["admin"]))["key"]
    b_key: dict[str, Any] = await create_key(client, admin_headers, b["id"], ["chat"])
    resp = await client.delete(f"/v1/keys/{b_key['id']}", headers=bearer(a_admin))
    assert resp.status_code == 404
    ids = [k["id"] for k in (await client.get("/v1/keys", headers=bearer(a_admin))).json()["data"]]
    assert b_key["id"] not in ids
    assert (await client.get("/v1/tenant", headers=bearer(b_key["key"]))).status_code == 200


async def test_bad_key_requests_are_rejected(client: Client, admin_headers: dict[str, str]) -> None:
    t = await create_tenant(client, admin_headers)
    url = f"/admin/tenants/{t['id']}/keys"
    for body in ({"name": "x", "scopes": []}, {"name": "x", "scopes": ["root"]},
                 {"name": "", "scopes": ["chat"]}, {"name": "n" * 101, "scopes": ["chat"]}):
        resp = await client.post(url, headers=admin_headers, json=body)
        assert resp.status_code == 400, body
    missing = "00000000-0000-4000-8000-000000000000"
    resp = await client.post(f"/admin/tenants/{missing}/keys", headers=admin_headers,
                             json={"name": "x", "scopes": ["chat"]})
    assert resp.status_code == 404
    resp = await client.delete(f"{url}/{missing}", headers=admin_headers)
    assert resp.status_code == 404


async def test_revoke_is_idempotent(client: Client, admin_headers: dict[str, str]) -> None:
    t = await create_tenant(client, admin_headers)
    k = await create_key(client, admin_headers, t["id"], ["chat"])
    url = f"/admin/tenants/{t['id']}/keys/{k['id']}"
    first = (await client.delete(url, headers=admin_headers)).json()
    second = (await client.delete(url, headers=admin_headers)).json()
    assert first["revoked_at"] == second["revoked_at"] is not None


async def test_rotation_keeps_the_old_key_working_for_its_overlap_only(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, t["id"], ["admin", "chat"]))["key"])
    old = (await client.post("/v1/keys", headers=admin,
                             json={"name": "backend", "scopes": ["chat"]})).json()
    assert (await client.get("/v1/models", headers=bearer(old["key"]))).status_code == 200
    resp = await client.post(f"/v1/keys/{old['id']}/rotate", headers=admin,
                             json={"overlap_s": 1})
    assert resp.status_code == 201, resp.text
    new = resp.json()
    assert new["replaces"] == old["id"] and new["key"] != old["key"]
    assert (new["name"], new["scopes"]) == ("backend", ["chat"])
    # Both work during the overlap...
    for key in (old["key"], new["key"]):
        assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
    listed = {k["id"]: k for k in (await client.get("/v1/keys", headers=admin)).json()["data"]}
    assert listed[old["id"]]["expires_at"] == new["old_key_expires_at"]
    assert listed[new["id"]]["expires_at"] is None
    await asyncio.sleep(1.2)
    # ...then only the replacement.
    gone = await client.get("/v1/models", headers=bearer(old["key"]))
    assert gone.status_code == 401 and "rotated" in gone.json()["detail"]
    assert (await client.get("/v1/models", headers=bearer(new["key"]))).status_code == 200
    # An expired (or revoked) key cannot be rotated again; another tenant's is not found.
    assert (await client.post(f"/v1/keys/{old['id']}/rotate", headers=admin)).status_code == 409
    other = await create_tenant(client, admin_headers)
    other_admin = bearer((await create_key(client, admin_headers, other["id"], ["admin"]))["key"])
    assert (await client.post(f"/v1/keys/{new['id']}/rotate",
                              headers=other_admin)).status_code == 404
    # The operator rotates with the default overlap (an hour).
    by_operator = await client.post(f"/admin/tenants/{t['id']}/keys/{new['id']}/rotate",
                                    headers=admin_headers)
    assert by_operator.status_code == 201
    until = datetime.fromisoformat(by_operator.json()["old_key_expires_at"])
    assert timedelta(minutes=59) < until - datetime.now(UTC) <= timedelta(hours=1)
    assert (await client.post(f"/v1/keys/{new['id']}/rotate", headers=admin,
                              json={"overlap_s": -1})).status_code == 400
