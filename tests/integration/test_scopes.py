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

from app.api.auth import PUBLIC_PATHS
from app.api.guards import platform_only
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
