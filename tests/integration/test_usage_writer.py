"""The batched usage writer against real PostgreSQL: many tenants' events in few
transactions, each tenant's rows under its own RLS scope, replays counted once, and a
PostgreSQL outage waited out without losing an event, and an event PostgreSQL refuses
quarantined without losing the rest of its batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.db.engine import Database, make_engine
from app.db.models import UsageEvent, UsageQuarantine
from app.observability.metrics import ServiceMetrics
from app.quotas import usage_writer
from app.quotas.usage_writer import (
    ROW_FIELDS,
    UsageEventQuarantinedError,
    UsageRow,
    UsageWriter,
    UsageWriterClosedError,
)
from app.settings import Settings
from tests.faults import TcpProxy
from tests.support import bearer, create_key, create_tenant, plain_dsn

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(make_engine(settings.database.application_url(), settings.database))
    yield database
    await database.close()


async def tenants(client: Client, admin: dict[str, str], n: int) -> list[uuid.UUID]:
    return [uuid.UUID((await create_tenant(client, admin))["id"]) for _ in range(n)]


def event(tenant_id: uuid.UUID, request_id: str, tokens: int = 7) -> UsageEvent:
    return UsageEvent(tenant_id=tenant_id, request_id=request_id, kind="chat", model="m",
                      prompt_tokens=tokens, completion_tokens=1, latency_ms=1.0, status="ok")


async def stored(settings: Settings, tenant_ids: list[uuid.UUID]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_dsn(settings.database.owner_url()))
    try:
        return list(await conn.fetch(
            "SELECT tenant_id, request_id, prompt_tokens FROM usage_events "
            "WHERE tenant_id = ANY($1::uuid[]) ORDER BY request_id", tenant_ids))
    finally:
        await conn.close()


async def test_many_tenants_events_go_in_few_transactions_and_replays_count_once(
    client: Client, admin_headers: dict[str, str], settings: Settings, db: Database,
) -> None:
    ids = await tenants(client, admin_headers, 3)
    writer = UsageWriter(db)
    writer.start()
    try:
        events = [event(ids[i % 3], f"r{i}") for i in range(600)]
        replays = [event(ids[0], "r0", tokens=999), event(ids[1], "r1", tokens=999)]
        results = await asyncio.gather(*(writer.record(e) for e in [*events, *replays]))
        assert results == [True] * 600 + [False, False]
        assert writer.batches < 20  # 602 events, a handful of transactions
        # Replaying later is refused too.
        assert await writer.record(event(ids[2], "r2")) is False
        # The same request id in another tenant is that tenant's own request.
        assert await writer.record(event(ids[2], "r0")) is True
    finally:
        await writer.close()
    rows = await stored(settings, ids)
    assert len(rows) == 601
    by_key = {(r["tenant_id"], r["request_id"]): r["prompt_tokens"] for r in rows}
    assert by_key[(ids[0], "r0")] == 7  # the first write stands
    assert sum(1 for t, _ in by_key if t == ids[1]) == 200
    with pytest.raises(UsageWriterClosedError):
        await writer.record(event(ids[0], "late"))


async def test_a_postgres_outage_is_waited_out_without_losing_events(
    client: Client, admin_headers: dict[str, str], settings: Settings,
) -> None:
    (tenant_id,) = await tenants(client, admin_headers, 1)
    url = settings.database.application_url()
    proxy = TcpProxy.for_postgres(url)
    await proxy.start()
    db = Database(make_engine(proxy.postgres_url(url), settings.database))
    writer = UsageWriter(db, retry_for_s=30)
    writer.start()
    try:
        assert await writer.record(event(tenant_id, "before")) is True
        await proxy.cut()  # PostgreSQL is gone: connections drop, new ones are refused
        during = [asyncio.ensure_future(writer.record(event(tenant_id, f"during{i}")))
                  for i in range(50)]
        await asyncio.sleep(1.5)
        assert not any(f.done() for f in during)  # waiting, not failed
        await proxy.start()
        assert await asyncio.wait_for(asyncio.gather(*during), 30) == [True] * 50
    finally:
        await writer.close()
        await db.close()
        await proxy.cut()
    rows = await stored(settings, [tenant_id])
    assert sorted(r["request_id"] for r in rows) == sorted(
        ["before", *(f"during{i}" for i in range(50))])


def test_plain_rows_have_the_tables_columns() -> None:
    columns = {c.name for c in UsageEvent.__table__.c} - {"id"}  # type: ignore[attr-defined]
    assert set(ROW_FIELDS) == columns


async def test_a_plain_row_is_stored_like_the_orm_event(
    client: Client, admin_headers: dict[str, str], settings: Settings, db: Database,
) -> None:
    [tenant_id] = await tenants(client, admin_headers, 1)
    writer = UsageWriter(db)
    writer.start()
    fields: dict[str, Any] = {
              "kind": "chat", "model": "m", "status": "ok", "end_user": "u1", "pool": "p",
              "replica": "http://r/v1", "prompt_tokens": 11, "completion_tokens": 3,
              "cached_tokens": 2, "ttft_ms": 4.5, "latency_ms": 9.0,
              "cost_usd": Decimal("0.00012345"), "gpu_seconds": 0.25}
    try:
        assert await writer.record(UsageRow(tenant_id=tenant_id, request_id="row",
                                            **fields)) is True
        assert await writer.record(UsageEvent(tenant_id=tenant_id, request_id="orm",
                                              **fields)) is True
        assert await writer.record(UsageRow(tenant_id=tenant_id, request_id="orm",
                                            **fields)) is False  # a replay either way
    finally:
        await writer.close()
    conn = await asyncpg.connect(plain_dsn(settings.database.owner_url()))
    try:
        rows = await conn.fetch(f"SELECT request_id, {', '.join(fields)} FROM usage_events "
                                "WHERE tenant_id = $1 ORDER BY request_id", tenant_id)
    finally:
        await conn.close()
    assert [r["request_id"] for r in rows] == ["orm", "row"]
    orm, row = ({k: v for k, v in r.items() if k != "request_id"} for r in rows)
    assert orm == row == fields


POISONS = {  # end users the API now refuses, as an older process could have sent them
    "nul": "bob\x00",  # PostgreSQL text cannot hold NUL
    "lone surrogate": "\ud800",  # not encodable as UTF-8 at all
    "too long": "u" * 300,  # over the column's 256 characters
}


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
async def test_one_unstorable_event_is_quarantined_and_the_other_499_are_stored(
    client: Client, admin_headers: dict[str, str], settings: Settings, db: Database,
    poison: str,
) -> None:
    ids = await tenants(client, admin_headers, 10)
    metrics = ServiceMetrics(10, lambda: ())
    writer = UsageWriter(db, on_quarantine=metrics.quarantined)
    writer.start()
    rows = [UsageRow(tenant_id=ids[i % 10], request_id=f"q{i}", kind="chat", model="m",
                     status="ok", prompt_tokens=5, end_user=f"user{i}") for i in range(500)]
    rows[257] = UsageRow(tenant_id=ids[7], request_id="poisoned", kind="chat", model="m",
                         status="ok", prompt_tokens=5, end_user=POISONS[poison])
    try:
        results = await asyncio.gather(*(writer.record(r) for r in rows),
                                       return_exceptions=True)
    finally:
        await writer.close()
    assert isinstance(results[257], UsageEventQuarantinedError)
    assert [r for i, r in enumerate(results) if i != 257] == [True] * 499
    stored_ids = {r["request_id"] for r in await stored(settings, ids)}
    assert stored_ids == {f"q{i}" for i in range(500) if i != 257}
    # The operator reads it, with the reason, over the API (and in the metric).
    page = (await client.get("/admin/usage/quarantine", headers=admin_headers,
                             params={"tenant_id": str(ids[7])})).json()
    [entry] = page["data"]
    assert entry["request_id"] == "poisoned" and entry["kind"] == "chat"
    assert entry["error"] and entry["reason"]
    assert entry["event"]["prompt_tokens"] == 5
    assert writer.quarantined == 1
    assert metrics.usage_quarantined.labels("chat", entry["error"])._value.get() == 1


async def test_the_quarantine_is_the_operators_alone(
    client: Client, admin_headers: dict[str, str], db: Database,
) -> None:
    [tenant_id] = await tenants(client, admin_headers, 1)
    writer = UsageWriter(db)
    writer.start()
    try:
        with pytest.raises(UsageEventQuarantinedError, match="CharacterNotInRepertoire"):
            await writer.record(UsageRow(tenant_id=tenant_id, request_id="bad\x00id",
                                         kind="chat", model="m", status="ok"))
    finally:
        await writer.close()
    async with db.tenant(tenant_id) as session:  # the tenant's own scope sees nothing
        assert (await session.execute(select(UsageQuarantine))).all() == []
    key = (await create_key(client, admin_headers, str(tenant_id), ["admin"]))["key"]
    response = await client.get("/admin/usage/quarantine", headers=bearer(key))
    assert response.status_code in (401, 403)
    page = (await client.get("/admin/usage/quarantine", headers=admin_headers,
                             params={"tenant_id": str(tenant_id)})).json()
    assert page["data"][0]["request_id"] == "bad\\u0000id"  # escaped, so it could be stored


async def test_an_event_the_quarantine_refuses_too_costs_only_itself(
    client: Client, admin_headers: dict[str, str], settings: Settings, db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken_quarantine(*_: object) -> tuple[str, str]:
        raise ValueError("the quarantine is broken too")

    monkeypatch.setattr(usage_writer, "quarantine", broken_quarantine)
    ids = await tenants(client, admin_headers, 2)
    writer = UsageWriter(db)
    writer.start()
    rows = [UsageRow(tenant_id=ids[i % 2], request_id=f"b{i}", kind="chat", model="m",
                     status="ok") for i in range(40)]
    rows[3].end_user = "\x00"
    try:
        results = await asyncio.gather(*(writer.record(r) for r in rows),
                                       return_exceptions=True)
    finally:
        await writer.close()
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [True] * 39
    assert len(await stored(settings, ids)) == 39


async def test_the_apps_writer_counts_quarantined_events_on_metrics(
    app: Litestar, client: Client, admin_headers: dict[str, str],
) -> None:
    [tenant_id] = await tenants(client, admin_headers, 1)
    poisoned = UsageRow(tenant_id=tenant_id, request_id="m\x00", kind="chat", model="m",
                        status="ok")

    async def record() -> None:  # on the app's own loop, as the chat path records
        with pytest.raises(UsageEventQuarantinedError):
            await app.state.usage_writer.record(poisoned)

    await asyncio.wrap_future(client.blocking_portal.start_task_soon(record))
    text = (await client.get("/metrics", headers=admin_headers)).text
    counted = {tuple(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "tenantrag_usage_events_quarantined_total"}
    assert counted[(("error", "CharacterNotInRepertoireError"), ("kind", "chat"))] >= 1
