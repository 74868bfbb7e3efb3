"""The audit log: every admin action and key operation leaves exactly one record, written
with the change (a failed change leaves none), without secrets; a tenant's admins read
their own tenant's records, the operator everyone's; the app's role can only add rows."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.engine import Database, make_engine
from app.settings import Settings
from tests.support import TEST_PEPPER, bearer, create_key, create_tenant

Client = AsyncTestClient[Litestar]
Row = tuple[str, str, str, str]  # actor, action, target type, target id


async def audit(client: Client, headers: dict[str, str], path: str = "/v1/audit",
                **params: Any) -> list[dict[str, Any]]:
    """One page of the audit log (newest first) as the caller sees it."""
    resp = await client.get(path, headers=headers, params=params)
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def rows(events: list[dict[str, Any]]) -> list[Row]:
    return [(e["actor"], e["action"], e["target_type"], e["target_id"]) for e in events]


async def owner_query(settings: Settings, sql: str, **params: Any) -> list[Any]:
    """Rows read as the database owner (what an attacker with a dump would see)."""
    engine = create_async_engine(settings.database.owner_url())
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
async def app_db(settings: Settings) -> AsyncIterator[Database]:
    """Connected exactly as the running app connects (its own role, no BYPASSRLS)."""
    db = Database(make_engine(settings.database.application_url(), settings.database))
    yield db
    await db.close()


async def test_operator_tenant_changes_are_recorded_once_each(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await create_tenant(client, admin_headers, system_prompt="Be brief.", rpm_limit=10)
    tid, url = t["id"], f"/admin/tenants/{t['id']}"
    patches = ({"tier": "enterprise", "rpm_limit": None, "name": t["name"]},
               {"system_prompt": "Be kind.", "system_message_policy": "refuse"},
               {"name": t["name"], "system_prompt": "Be kind."})  # the last one changes nothing
    for body in patches:
        assert (await client.patch(url, headers=admin_headers, json=body)).status_code == 200
    for step in ("suspend", "suspend", "activate"):  # suspending twice changes nothing
        assert (await client.post(f"{url}/{step}", headers=admin_headers)).status_code == 200

    events = await audit(client, admin_headers, "/admin/audit", tenant_id=tid)
    target = ("tenant", tid)
    assert rows(events) == [("operator", a, *target) for a in (
        "tenant.activated", "tenant.suspended", "system_prompt.changed", "tenant.updated",
        "tenant.created")]
    activated, suspended, prompt, updated, created = (e["details"] for e in events)
    assert created["slug"] == t["slug"] and created["tier"] == "pro"
    assert created["rpm_limit"] == 10 and created["system_prompt_version"] == 1
    assert "system_prompt" not in created  # the text lives in its versions
    assert updated == {"changes": {"tier": {"from": "pro", "to": "enterprise"},
                                   "rpm_limit": {"from": 10, "to": None}}}
    assert prompt == {"version": 2, "system_message_policy": {"from": "append", "to": "refuse"}}
    assert suspended == {"changes": {"status": {"from": "active", "to": "suspended"}}}
    assert activated == {"changes": {"status": {"from": "suspended", "to": "active"}}}
    assert all(e["tenant_id"] == tid for e in events)


async def test_key_operations_are_recorded_without_secrets(
    client: Client, admin_headers: dict[str, str], settings: Settings
) -> None:
    t = await create_tenant(client, admin_headers)
    admin = await create_key(client, admin_headers, t["id"], ["admin", "chat"])
    auth, me = bearer(admin["key"]), f"key:{admin['id']}"
    resp = await client.post("/v1/keys", json={"name": "widget", "scopes": ["chat"]},
                             headers={**auth, "X-Request-Id": "audit-mint-1"})
    widget = resp.json()
    resp = await client.post(f"/v1/keys/{widget['id']}/rotate", json={"overlap_s": 60},
                             headers=auth)
    assert resp.status_code == 201, resp.text
    replacement = resp.json()
    for _ in range(2):  # the second revoke changes nothing
        resp = await client.delete(f"/v1/keys/{replacement['id']}", headers=auth)
        assert resp.status_code == 200
    resp = await client.post(f"/v1/keys/{replacement['id']}/rotate", headers=auth)
    assert resp.status_code == 409  # a revoked key cannot be rotated: nothing recorded
    resp = await client.delete(f"/admin/tenants/{t['id']}/keys/{widget['id']}",
                               headers=admin_headers)
    assert resp.status_code == 200

    events = await audit(client, auth)
    assert rows(events) == [
        ("operator", "key.revoked", "api_key", widget["id"]),
        (me, "key.revoked", "api_key", replacement["id"]),
        (me, "key.rotated", "api_key", widget["id"]),
        (me, "key.created", "api_key", widget["id"]),
        ("operator", "key.created", "api_key", admin["id"]),
        ("operator", "tenant.created", "tenant", t["id"]),
    ]
    revoked, _, rotated, minted = (e["details"] for e in events[:4])
    assert minted == {"name": "widget", "prefix": widget["prefix"], "scopes": ["chat"]}
    assert events[3]["request_id"] == "audit-mint-1"
    assert rotated["replaced_by"] == replacement["id"]
    assert rotated["replacement_prefix"] == replacement["prefix"]
    assert rotated["old_key_expires_at"] is not None
    assert revoked == {"name": "widget", "prefix": widget["prefix"]}

    hashes = [r[0] for r in await owner_query(
        settings, "SELECT secret_hash FROM api_keys WHERE tenant_id = :t", t=t["id"])]
    dumped = [r[0] for r in await owner_query(
        settings, "SELECT row_to_json(a)::text FROM audit_events a WHERE tenant_id = :t",
        t=t["id"])]
    secrets = [k["key"] for k in (admin, widget, replacement)]
    secrets += [s.split("_", 2)[2] for s in secrets] + hashes  # trk_<prefix>_<secret>
    assert len(dumped) == 6 and len(hashes) == 3
    assert not [s for s in secrets for row in dumped if s in row]


async def test_tenant_admin_changes_are_recorded_and_failures_are_not(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await create_tenant(client, admin_headers)
    admin = await create_key(client, admin_headers, t["id"], ["admin", "chat"])
    auth, me = bearer(admin["key"]), f"key:{admin['id']}"
    kbs = "/v1/knowledge-bases"
    kb = (await client.post(kbs, json={"name": "handbook"}, headers=auth)).json()
    faq = (await client.post(kbs, json={"name": "faq"}, headers=auth)).json()
    # Refused changes: a duplicate name, on create and on rename.
    assert (await client.post(kbs, json={"name": "handbook"}, headers=auth)).status_code == 409
    resp = await client.patch(f"{kbs}/{faq['id']}", json={"name": "handbook"}, headers=auth)
    assert resp.status_code == 409
    for body in ({"name": "policies"}, {"description": "HR"}, {"description": "HR"}):
        assert (await client.patch(f"{kbs}/{kb['id']}", json=body, headers=auth)).is_success
    docs = []
    for target in (kb, faq):
        resp = await client.post(f"{kbs}/{target['id']}/documents", headers=auth,
                                 json={"text": "Door 7 opens with the badge.",
                                       "filename": "doors.md"})
        assert resp.status_code == 202, resp.text
        docs.append(resp.json()["data"][0])
    deletes = (f"{kbs}/{kb['id']}/documents/{docs[0]['id']}", f"{kbs}/{faq['id']}")
    for path in deletes:
        assert (await client.delete(path, headers=auth)).status_code == 204
    resp = await client.put("/v1/tenant/system-prompt", json={"text": "Cite the handbook."},
                            headers=auth)
    assert resp.status_code == 200

    events = await audit(client, auth)
    assert rows(events) == [
        (me, "system_prompt.changed", "tenant", t["id"]),
        (me, "knowledge_base.deleted", "knowledge_base", faq["id"]),
        (me, "document.deleted", "document", docs[0]["id"]),
        (me, "knowledge_base.updated", "knowledge_base", kb["id"]),
        (me, "knowledge_base.renamed", "knowledge_base", kb["id"]),
        (me, "knowledge_base.created", "knowledge_base", faq["id"]),
        (me, "knowledge_base.created", "knowledge_base", kb["id"]),
        ("operator", "key.created", "api_key", admin["id"]),
        ("operator", "tenant.created", "tenant", t["id"]),
    ]
    prompt, kb_deleted, doc_deleted, updated, renamed, created = (
        e["details"] for e in events[:6])
    assert prompt == {"version": 1}
    assert kb_deleted == {"name": "faq", "documents": 1}
    assert doc_deleted == {"kb_id": kb["id"], "filename": "doors.md", "external_id": None,
                           "version": 1}
    assert updated == {"changes": {"description": {"from": "", "to": "HR"}}}
    assert renamed == {"changes": {"name": {"from": "handbook", "to": "policies"}}}
    assert created == {"name": "faq", "description": ""}


async def test_duplicate_tenant_slug_leaves_no_record(
    client: Client, admin_headers: dict[str, str], settings: Settings
) -> None:
    t = await create_tenant(client, admin_headers)
    resp = await client.post("/admin/tenants", headers=admin_headers,
                             json={"slug": t["slug"], "name": "Again"})
    assert resp.status_code == 409
    found = await owner_query(
        settings, "SELECT tenant_id FROM audit_events WHERE action = 'tenant.created' "
        "AND details->>'slug' = :slug", slug=t["slug"])
    assert [str(r[0]) for r in found] == [t["id"]]


async def test_tenants_read_only_their_own_records_and_the_operator_reads_all(
    client: Client, admin_headers: dict[str, str]
) -> None:
    made = []
    for _ in range(2):
        tenant = await create_tenant(client, admin_headers)
        auth = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
        kb = (await client.post("/v1/knowledge-bases", json={"name": "kb"}, headers=auth)).json()
        made.append((tenant["id"], auth, kb["id"]))
    (a, a_auth, a_kb), (b, b_auth, b_kb) = made

    for own, auth, kb, other, other_kb in ((a, a_auth, a_kb, b, b_kb), (b, b_auth, b_kb, a, a_kb)):
        events = await audit(client, auth, limit=500)
        assert {e["tenant_id"] for e in events} == {own}
        assert kb in {e["target_id"] for e in events}
        assert not {other, other_kb} & {e["target_id"] for e in events}
        # A tenant_id of the tenant's choosing is not a filter it can use.
        sneaky = await audit(client, auth, tenant_id=other)
        assert {e["tenant_id"] for e in sneaky} == {own}

    for tenant, kb in ((a, a_kb), (b, b_kb)):
        events = await audit(client, admin_headers, "/admin/audit", tenant_id=tenant)
        assert {e["tenant_id"] for e in events} == {tenant}
        assert kb in {e["target_id"] for e in events}
    newest = await audit(client, admin_headers, "/admin/audit", limit=10)
    assert {a_kb, b_kb} <= {e["target_id"] for e in newest}


async def test_only_admin_keys_and_the_operator_read_the_log(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await create_tenant(client, admin_headers)
    for scopes in (["chat"], ["ingest"], ["chat", "ingest"]):
        key = (await create_key(client, admin_headers, t["id"], scopes))["key"]
        resp = await client.get("/v1/audit", headers=bearer(key))
        assert resp.status_code == 403, scopes
        assert resp.json()["code"] == "forbidden"
    admin = (await create_key(client, admin_headers, t["id"], ["admin"]))["key"]
    assert (await client.get("/admin/audit", headers=bearer(admin))).status_code == 403
    assert (await client.get("/v1/audit", headers=admin_headers)).status_code == 403
    assert (await client.get("/v1/audit")).status_code == 401


async def test_filters_pages_and_csv(client: Client, admin_headers: dict[str, str]) -> None:
    t = await create_tenant(client, admin_headers)
    keys = [await create_key(client, admin_headers, t["id"], ["chat"]) for _ in range(3)]
    admin = bearer((await create_key(client, admin_headers, t["id"], ["admin", "chat"]))["key"])
    await client.delete(f"/v1/keys/{keys[0]['id']}", headers=admin)
    everything = await audit(client, admin)
    assert [e["action"] for e in everything] == ["key.revoked", *["key.created"] * 4,
                                                 "tenant.created"]
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)

    created = await audit(client, admin, action="key.created")
    assert [e["id"] for e in created] == [e["id"] for e in everything[1:5]]
    assert len(await audit(client, admin, action="key.*")) == 5
    assert await audit(client, admin, action="knowledge_base.created") == []

    paged, before = [], None
    while True:
        params: dict[str, Any] = {"limit": 4} | ({"before": before} if before else {})
        page = (await client.get("/v1/audit", headers=admin, params=params)).json()
        paged += page["data"]
        before = page["next_before"]
        if before is None:
            break
    assert paged == everything

    now = datetime.now(UTC)
    assert await audit(client, admin, **{"from": (now + timedelta(hours=1)).isoformat()}) == []
    assert await audit(client, admin, to=(now - timedelta(days=1)).isoformat()) == []
    window = {"from": (now - timedelta(minutes=5)).isoformat(),
              "to": (now + timedelta(minutes=5)).isoformat()}
    assert await audit(client, admin, **window) == everything
    for bad in ({"from": "2026-11-01T00:00:00"}, {"from": window["to"], "to": window["from"]},
                {"action": "key.created; drop table"}, {"limit": 0}, {"before": "x"},
                {"before": 2**63}, {"from": "0001-01-01T00:00:00+14:00"}):
        resp = await client.get("/v1/audit", headers=admin, params=bad)
        assert resp.status_code == 400, (bad, resp.text)

    resp = await client.get("/v1/audit", headers=admin, params={"format": "csv"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(resp.text)))
    assert [r["action"] for r in table] == [e["action"] for e in everything]
    assert table[0]["actor"] == everything[0]["actor"] and table[0]["tenant_id"] == t["id"]
    assert json.loads(table[0]["details"]) == everything[0]["details"]


async def test_the_cli_is_named_as_the_actor(
    client: Client, admin_headers: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    t = await create_tenant(client, admin_headers)
    env = {**os.environ, "APP_ENV": "test", "DATABASE_URL": settings.database.url or "",
           "REDIS_URL": settings.redis.url or "", "AUTH_KEY_PEPPER": TEST_PEPPER,
           "APP_DATA_DIR": str(tmp_path)}
    tenantrag = str(Path(sys.executable).parent / "tenantrag")
    done = await asyncio.to_thread(
        subprocess.run, [tenantrag, "keys", "create", t["slug"], "--name", "nightly",
                         "--scope", "ingest"], env=env, capture_output=True, text=True,
        timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    key_id = done.stdout.split("key id:")[1].split()[0]
    events = await audit(client, admin_headers, "/admin/audit", tenant_id=t["id"])
    assert rows(events)[0] == ("cli", "key.created", "api_key", key_id)
    assert events[0]["request_id"] is None


async def test_the_app_role_can_add_records_but_never_change_or_remove_them(
    client: Client, admin_headers: dict[str, str], app_db: Database
) -> None:
    t = await create_tenant(client, admin_headers)
    tid = uuid.UUID(t["id"])
    insert = text("INSERT INTO audit_events (tenant_id, actor, action, target_type, created_at) "
                  "VALUES (:t, 'operator', 'pool.reloaded', 'pool', now()) RETURNING id")
    async with app_db.platform() as s:  # a platform-wide record: no tenant
        platform_row = (await s.execute(insert, {"t": None})).scalar_one()
    for sql in ("UPDATE audit_events SET actor = 'nobody'", "DELETE FROM audit_events",
                "TRUNCATE audit_events"):
        for scope in (app_db.platform(), app_db.tenant(tid)):
            with pytest.raises(DBAPIError, match="permission denied"):
                async with scope as s:
                    await s.execute(text(sql))
    # A tenant can neither write a platform-wide record nor one for another tenant.
    for other in (None, uuid.uuid4()):
        with pytest.raises(DBAPIError, match="row-level security"):
            async with app_db.tenant(tid) as s:
                await s.execute(insert, {"t": other})

    async with app_db.platform() as s:
        seen = (await s.execute(text("SELECT id, actor FROM audit_events WHERE id = :i"),
                                {"i": platform_row})).all()
        own = (await s.execute(text("SELECT actor FROM audit_events WHERE tenant_id = :t"),
                               {"t": tid})).scalars().all()
    assert [tuple(r) for r in seen] == [(platform_row, "operator")]
    assert own == ["operator"]  # tenant.created, unchanged
    async with app_db.tenant(tid) as s:
        visible = (await s.execute(text("SELECT id FROM audit_events"))).scalars().all()
    assert platform_row not in visible and len(visible) == 1
    ops = await audit(client, admin_headers, "/admin/audit", action="pool.reloaded")
    assert [e["id"] for e in ops][:1] == [platform_row] and ops[0]["tenant_id"] is None
