"""The operator's tenant registry: CRUD and the bad inputs people actually send."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import create_tenant, unique_slug

Client = AsyncTestClient[Litestar]


async def test_create_get_and_list(client: Client, admin_headers: dict[str, str]) -> None:
    created = await create_tenant(
        client, admin_headers, tier="enterprise", system_prompt="Be brief.",
        allowed_models=["smollm2", "llama"], rpm_limit=60, monthly_token_budget=10**9,
    )
    assert created["status"] == "active"
    assert created["tier"] == "enterprise"
    got = (await client.get(f"/admin/tenants/{created['id']}", headers=admin_headers)).json()
    assert got == created
    page = (await client.get("/admin/tenants?limit=200", headers=admin_headers)).json()
    assert created["id"] in {t["id"] for t in page["data"]}
    assert page["total"] >= 1 and page["limit"] == 200


async def test_list_filters_by_status(client: Client, admin_headers: dict[str, str]) -> None:
    t = await create_tenant(client, admin_headers)
    await client.post(f"/admin/tenants/{t['id']}/suspend", headers=admin_headers)
    suspended = (await client.get("/admin/tenants?status=suspended&limit=200",
                                  headers=admin_headers)).json()
    assert t["id"] in {x["id"] for x in suspended["data"]}
    assert all(x["status"] == "suspended" for x in suspended["data"])


async def test_update_changes_only_fields_sent(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await create_tenant(client, admin_headers, rpm_limit=10, name="Before")
    resp = await client.patch(f"/admin/tenants/{t['id']}", headers=admin_headers,
                              json={"tier": "enterprise", "rpm_limit": None})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tier"] == "enterprise" and body["rpm_limit"] is None
    assert body["name"] == "Before"
    assert body["updated_at"] > t["updated_at"]


async def test_duplicate_slug_is_409(client: Client, admin_headers: dict[str, str]) -> None:
    t = await create_tenant(client, admin_headers)
    resp = await client.post("/admin/tenants", headers=admin_headers,
                             json={"slug": t["slug"], "name": "Again"})
    assert resp.status_code == 409
    assert resp.json()["code"] == "conflict"
    assert t["slug"] in resp.json()["detail"]


async def bad_create(client: Client, admin_headers: dict[str, str], body: dict[str, Any]) -> Any:
    resp = await client.post("/admin/tenants", headers=admin_headers, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    return resp.json()


async def test_invalid_tier_is_400_and_names_the_field(
    client: Client, admin_headers: dict[str, str]
) -> None:
    body = await bad_create(client, admin_headers,
                            {"slug": unique_slug(), "name": "x", "tier": "platinum"})
    assert any(e["key"] == "tier" for e in body["errors"])


async def test_oversized_and_malformed_fields_are_400(
    client: Client, admin_headers: dict[str, str]
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"slug": unique_slug(), "name": "n" * 201}, "name"),
        ({"slug": "x" * 64, "name": "n"}, "slug"),
        ({"slug": "Has Spaces", "name": "n"}, "slug"),
        ({"slug": unique_slug(), "name": "n", "system_prompt": "p" * 20_001}, "system_prompt"),
        ({"slug": unique_slug(), "name": "n", "allowed_models": ["m"] * 51}, "allowed_models"),
        ({"slug": unique_slug(), "name": "n", "rpm_limit": -1}, "rpm_limit"),
        ({"slug": unique_slug(), "name": "   "}, "name"),
        ({"slug": unique_slug()}, "name"),
    ]
    for body, field in cases:
        problem = await bad_create(client, admin_headers, body)
        assert any(e["key"] == field for e in problem["errors"]), (field, problem)


async def test_unknown_field_and_non_json_are_400(
    client: Client, admin_headers: dict[str, str]
) -> None:
    await bad_create(client, admin_headers, {"slug": unique_slug(), "name": "n", "colour": "red"})
    resp = await client.post("/admin/tenants", headers={**admin_headers,
                             "content-type": "application/json"}, content=b"{not json")
    assert resp.status_code == 400
    assert resp.json()["code"] == "invalid_request"


async def test_null_for_required_field_in_update_is_422(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await create_tenant(client, admin_headers)
    resp = await client.patch(f"/admin/tenants/{t['id']}", headers=admin_headers,
                              json={"name": None})
    assert resp.status_code == 422
    assert "name" in resp.json()["detail"]


async def test_unknown_tenant_is_404_everywhere(
    client: Client, admin_headers: dict[str, str]
) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    for method, path in [("GET", ""), ("PATCH", ""), ("POST", "/suspend"), ("GET", "/keys")]:
        kwargs: dict[str, Any] = {"json": {"name": "x"}} if method == "PATCH" else {}
        resp = await client.request(method, f"/admin/tenants/{missing}{path}",
                                    headers=admin_headers, **kwargs)
        if path == "/keys":
            assert resp.status_code == 200 and resp.json() == {"data": []}
            continue
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json()["code"] == "not_found"
    resp = await client.get("/admin/tenants/not-a-uuid", headers=admin_headers)
    assert resp.status_code in (400, 404)


async def test_paging_bounds_are_enforced(client: Client, admin_headers: dict[str, str]) -> None:
    for query in ("limit=0", "limit=201", "offset=-1", "status=deleted"):
        resp = await client.get(f"/admin/tenants?{query}", headers=admin_headers)
        assert resp.status_code == 400, query
