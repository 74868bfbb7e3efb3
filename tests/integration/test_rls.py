"""Row-level security, proven on the app's own database role.

Connected exactly as the running app connects (non-owner role, no BYPASSRLS), tenant A's
transaction must not see, change or delete tenant B's rows, whatever the SQL says.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.engine import Database, make_engine
from app.settings import Settings
from tests.support import create_key, create_tenant

# Every table with a tenant_id column, plus the registry itself; found from the catalog
# so a new table without row-level security fails this file without anyone editing it.
FIND_TENANT_TABLES = text(
    "SELECT DISTINCT table_name FROM information_schema.columns "
    "WHERE table_schema = 'public' AND column_name = 'tenant_id'"
)


@pytest.fixture(scope="module")
async def tenant_tables(settings: Settings) -> list[str]:
    engine = create_async_engine(settings.database.owner_url())
    async with engine.connect() as conn:
        names = (await conn.execute(FIND_TENANT_TABLES)).scalars().all()
    await engine.dispose()
    assert "api_keys" in names
    return ["tenants", *sorted(names)]


@pytest.fixture(scope="module")
async def app_db(settings: Settings) -> AsyncIterator[Database]:
    db = Database(make_engine(settings.database.application_url(), settings.database))
    yield db
    await db.close()


@pytest.fixture(scope="module")
async def two_tenants(
    client: AsyncTestClient[Litestar], admin_headers: dict[str, str]
) -> tuple[uuid.UUID, uuid.UUID]:
    a = await create_tenant(client, admin_headers)
    b = await create_tenant(client, admin_headers)
    await create_key(client, admin_headers, a["id"], ["chat"])
    await create_key(client, admin_headers, b["id"], ["chat"])
    return uuid.UUID(a["id"]), uuid.UUID(b["id"])


async def test_app_role_cannot_bypass_rls(app_db: Database, tenant_tables: list[str]) -> None:
    async with app_db.unscoped() as s:
        row = (await s.execute(text(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ))).one()
        forced = (await s.execute(text(
            "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relname = ANY(:t) AND relkind = 'r'"), {"t": tenant_tables})).all()
    assert (row.rolsuper, row.rolbypassrls) == (False, False)
    assert {r.relname for r in forced} == set(tenant_tables)
    assert all(r.relrowsecurity and r.relforcerowsecurity for r in forced)


async def test_no_tenant_set_sees_no_rows(
    app_db: Database, two_tenants: object, tenant_tables: list[str]
) -> None:
    async with app_db.unscoped() as s:
        for table in tenant_tables:
            count = (await s.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            assert count == 0, table
            crafted = text(f"SELECT count(*) FROM {table} WHERE true OR 1 = 1")
            assert (await s.execute(crafted)).scalar_one() == 0


async def test_tenant_a_cannot_read_b(
    app_db: Database, two_tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_tenants
    async with app_db.tenant(a) as s:
        keys = (await s.execute(text("SELECT tenant_id FROM api_keys"))).scalars().all()
        crafted = (await s.execute(
            text("SELECT count(*) FROM api_keys WHERE tenant_id = :b OR true"), {"b": b}
        )).scalar_one()
        tenants = (await s.execute(text("SELECT id FROM tenants"))).scalars().all()
    assert set(keys) == {a}
    assert crafted == 1
    assert tenants == [a]


async def test_tenant_a_cannot_update_or_delete_b(
    app_db: Database, two_tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_tenants
    async with app_db.tenant(a) as s:
        upd = await s.execute(
            text("UPDATE api_keys SET name = 'pwned' WHERE tenant_id = :b"), {"b": b})
        upd_t = await s.execute(
            text("UPDATE tenants SET name = 'pwned' WHERE id = :b"), {"b": b})
        dele = await s.execute(text("DELETE FROM api_keys WHERE tenant_id = :b"), {"b": b})
    assert (upd.rowcount, upd_t.rowcount, dele.rowcount) == (0, 0, 0)  # type: ignore[attr-defined]
    async with app_db.tenant(b) as s:
        names = (await s.execute(text("SELECT name FROM api_keys"))).scalars().all()
        tname = (await s.execute(text("SELECT name FROM tenants"))).scalar_one()
    assert names == ["test"]
    assert tname != "pwned"


async def test_tenant_a_cannot_write_rows_for_b(
    app_db: Database, two_tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_tenants
    insert = text(
        "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_hash, scopes, created_at) "
        "VALUES (gen_random_uuid(), :b, 'x', :p, 'h', '{chat}', now())"
    )
    with pytest.raises(DBAPIError, match="row-level security"):
        async with app_db.tenant(a) as s:
            await s.execute(insert, {"b": b, "p": uuid.uuid4().hex[:12]})
    move = text("UPDATE api_keys SET tenant_id = :b WHERE tenant_id = :a")
    with pytest.raises(DBAPIError, match="row-level security"):
        async with app_db.tenant(a) as s:
            await s.execute(move, {"a": a, "b": b})


async def test_app_role_cannot_disable_rls(app_db: Database) -> None:
    with pytest.raises(DBAPIError, match="must be owner"):
        async with app_db.unscoped() as s:
            await s.execute(text("ALTER TABLE api_keys DISABLE ROW LEVEL SECURITY"))
