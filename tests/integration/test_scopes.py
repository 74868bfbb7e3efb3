"""Scopes are enforced on every route, enumerated from the app's own route table: a key
without the scope a route needs gets 403 naming it, whatever the ids and body; operator
routes refuse every tenant key; and a route that guards nothing is one of the few meant
to be open to any valid key (a new unguarded route fails this test)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from app.http.auth import PUBLIC_PATHS
from app.http.guards import platform_only
from tests.support import bearer, create_key, create_tenant

Client = AsyncTestClient[Litestar]
SCOPES = frozenset({"admin", "chat", "ingest"})
# Routes any valid tenant key may call, with nothing to guard but the key itself.
ANY_KEY = {("GET", "/v1/tenant")}


def operations(app: Litestar) -> list[tuple[str, str, HTTPRouteHandler]]:
    """(method, path template, handler) of every route behind authentication."""
    found: list[tuple[str, str, HTTPRouteHandler]] = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or any(route.path.startswith(p)
                                                   for p in PUBLIC_PATHS):
            continue
        for handler in route.route_handlers:
            if handler.opt.get("exclude_from_auth"):
                continue
            found += [(m, route.path_format, handler) for m in handler.http_methods
                      if m != "OPTIONS"]
    return found


async def test_every_route_needs_its_scope_and_nothing_is_left_unguarded(
    app: Litestar, client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    keys: dict[frozenset[str], dict[str, str]] = {}

    async def key_with(scopes: frozenset[str]) -> dict[str, str]:
        if scopes not in keys:
            made = await create_key(client, admin_headers, tenant["id"], sorted(scopes))
            keys[scopes] = bearer(made["key"])
        return keys[scopes]

    unguarded, checked = set(), 0
    for method, path, handler in operations(app):
        guards = handler.resolve_guards()
        url = re.sub(r"\{\w+\}", str(uuid.uuid4()), path)
        if platform_only in guards:
            resp = await client.request(method, url, headers=await key_with(SCOPES))
            assert resp.status_code == 403, (method, path, resp.text)
            checked += 1
            continue
        needed: set[Any] = set()
        for guard in guards:
            needed |= set(getattr(guard, "required_scopes", ()))
        if not needed:
            unguarded.add((method, path))
            continue
        lacking = SCOPES - {str(s) for s in needed}
        if not lacking:
            continue  # any scope will do: nothing to refuse
        resp = await client.request(method, url, headers=await key_with(frozenset(lacking)))
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json()["code"] == "forbidden" and "scope" in resp.json()["detail"]
        checked += 1
    assert unguarded == ANY_KEY, f"routes guarded by no scope: {sorted(unguarded - ANY_KEY)}"
    assert checked >= 30  # the route table was really walked


async def test_a_key_mints_no_scope_it_lacks(client: Client, admin_headers: dict[str, str]) -> None:
    tenant = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    # An admin-only key minting a chat key could read every end user's conversations.
    for scopes in (["chat"], ["admin", "chat", "ingest"]):
        resp = await client.post("/v1/keys", headers=admin, json={"name": "w", "scopes": scopes})
        assert resp.status_code == 403, resp.text
        problem = resp.json()
        assert problem["code"] == "forbidden" and "'chat'" in problem["detail"]
        assert problem["missing_scopes"] == sorted(set(scopes) - {"admin"})
    listed = (await client.get("/v1/keys", headers=admin)).json()["data"]
    assert [k["scopes"] for k in listed] == [["admin"]]  # nothing was minted
    assert (await client.get("/v1/conversations", headers=admin)).status_code == 403
    # A subset (or the same set) is fine; the operator stands above tenants.
    resp = await client.post("/v1/keys", headers=admin, json={"name": "a", "scopes": ["admin"]})
    assert resp.status_code == 201, resp.text
    wide = bearer((await create_key(client, admin_headers, tenant["id"], sorted(SCOPES)))["key"])
    resp = await client.post("/v1/keys", headers=wide, json={"name": "c", "scopes": ["chat"]})
    assert resp.status_code == 201, resp.text


async def test_a_key_rotates_and_revokes_only_keys_within_its_scopes(
    client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    wider = await create_key(client, admin_headers, tenant["id"], ["chat", "ingest"])
    # Rotating would hand the admin-only caller the wider key's new secret.
    rotated = await client.post(f"/v1/keys/{wider['id']}/rotate", headers=admin, json={})
    revoked = await client.delete(f"/v1/keys/{wider['id']}", headers=admin)
    for resp in (rotated, revoked):
        assert resp.status_code == 403, resp.text
        assert resp.json()["missing_scopes"] == ["chat", "ingest"]
        assert "'chat', 'ingest' scopes" in resp.json()["detail"]
    listed = (await client.get("/v1/keys", headers=admin)).json()["data"]
    assert len(listed) == 2 and all(k["revoked_at"] is k["expires_at"] is None for k in listed)
    assert (await client.get("/v1/models", headers=bearer(wider["key"]))).status_code == 200
    # A key holding every scope the target has may rotate and revoke it.
    holder = bearer((await create_key(client, admin_headers, tenant["id"],
                                      ["admin", "chat", "ingest"]))["key"])
    resp = await client.post(f"/v1/keys/{wider['id']}/rotate", headers=holder, json={})
    assert resp.status_code == 201, resp.text
    assert resp.json()["scopes"] == ["chat", "ingest"]
    resp = await client.delete(f"/v1/keys/{resp.json()['id']}", headers=holder)
    assert resp.status_code == 200 and resp.json()["revoked_at"] is not None
    # An admin-only key manages admin-only keys; the operator manages any.
    peer = await create_key(client, admin_headers, tenant["id"], ["admin"])
    assert (await client.delete(f"/v1/keys/{peer['id']}", headers=admin)).status_code == 200
    resp = await client.delete(f"/admin/tenants/{tenant['id']}/keys/{wider['id']}",
                               headers=admin_headers)
    assert resp.status_code == 200
