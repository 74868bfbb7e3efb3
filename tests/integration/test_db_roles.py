"""The API and workers refuse to start as a role that row-level security does not bind:
a superuser, a BYPASSRLS role, the owner of the tenant tables (or a role that may become
one of these). The application role that ``migrate`` creates, which every other test and
``make run`` use, passes."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.db.engine import make_engine
from app.db.role_check import UnsafeDatabaseRoleError, inspect_role
from app.embeddings import Models
from app.hardening import PR_GET_DUMPABLE
from app.server.factory import create_app
from app.settings import Settings
from tests.support import PLATFORM_KEY, TEST_PEPPER, migrated_database, plain_dsn
from workers.broker import setup_broker
from workers.runtime import WorkerRuntime


def connecting_as(settings: Settings, url: str) -> Settings:
    """``settings`` with the app's connection (``DATABASE_APP_URL``) set to ``url``."""
    return settings.model_copy(update={
        "database": settings.database.model_copy(update={"app_url": url})})


def as_role(url: str, role: str) -> str:
    """``url`` (no password: the test server trusts local connections) as ``role``."""
    return re.sub(r"://[^@/]*@", f"://{role}@", url, count=1)


@asynccontextmanager
async def login_role(owner_url: str, options: str) -> AsyncIterator[str]:
    """A throwaway login role with ``options``; its name. Dropped afterwards."""
    name = f"t_role_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(plain_dsn(owner_url))
    try:
        await admin.execute(f'CREATE ROLE "{name}" LOGIN {options}')
        yield name
    finally:
        await admin.execute(f'DROP OWNED BY "{name}" CASCADE')
        await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        await admin.close()


async def refusal_of_api(settings: Settings, models: Models) -> str:
    """Start the API on ``settings``; the start-up error it refuses with."""
    app = create_app(settings, models=models)
    with pytest.raises(BaseException) as refused:
        async with AsyncTestClient(app):
            pass
    error: BaseException = refused.value
    while isinstance(error, BaseExceptionGroup):  # the test client's task group wraps it
        error = error.exceptions[0]
    assert isinstance(error, UnsafeDatabaseRoleError), repr(error)
    return str(error)


def refusal_of_worker(settings: Settings, models: Models) -> str:
    runtime = WorkerRuntime(settings, setup_broker(settings), models=models)
    try:
        with pytest.raises(UnsafeDatabaseRoleError) as refused:
            runtime.start()
    finally:
        runtime.stop()
    return str(refused.value)


async def test_the_application_role_passes(settings: Settings) -> None:
    engine = make_engine(settings.database.application_url(), settings.database)
    try:
        finding = await inspect_role(engine)
    finally:
        await engine.dispose()
    assert finding.role == settings.database.app_role and finding.problems() == []


async def test_api_and_worker_refuse_a_superuser(settings: Settings, models: Models) -> None:
    superuser = connecting_as(settings, settings.database.owner_url())  # postgres here
    for message in (await refusal_of_api(superuser, models),
                    refusal_of_worker(superuser, models)):
        assert "refuses to start" in message and "it is a superuser" in message, message
        assert "DATABASE_APP_URL" in message


async def test_api_and_worker_refuse_the_tables_owner(settings: Settings, models: Models) -> None:
    owner_url = settings.database.owner_url()
    async with (login_role(owner_url, "NOSUPERUSER NOBYPASSRLS") as owner,
                migrated_database(owner_url, "tenantrag_owner") as db_url):
        admin = await asyncpg.connect(plain_dsn(db_url))
        try:  # as if the owner role had run the migrations itself
            for table in ("tenants", "documents", "api_keys"):
                await admin.execute(f'ALTER TABLE {table} OWNER TO "{owner}"')
        finally:
            await admin.close()
        as_owner = connecting_as(settings, as_role(db_url, owner))
        for message in (await refusal_of_api(as_owner, models),
                        refusal_of_worker(as_owner, models)):
            assert f"role {owner!r}" in message, message
            assert "owns the tenant tables (api_keys, documents, tenants)" in message


async def test_a_bypassrls_role_or_one_that_may_become_it_is_refused(
    settings: Settings, models: Models,
) -> None:
    owner_url = settings.database.owner_url()
    async with (login_role(owner_url, "BYPASSRLS") as bypass,
                login_role(owner_url, "NOSUPERUSER") as member):
        admin = await asyncpg.connect(plain_dsn(owner_url))
        try:
            await admin.execute(f'GRANT "{bypass}" TO "{member}"')
        finally:
            await admin.close()
        for role in (bypass, member):
            message = await refusal_of_api(connecting_as(settings, as_role(owner_url, role)),
                                           models)
            reason = "it has BYPASSRLS" if role == bypass else f"SET ROLE to {bypass} (BYPASSRLS)"
            assert reason in message, message


def test_tenantrag_serve_exits_with_the_reason_as_a_superuser(
    settings: Settings, tmp_path: Path,
) -> None:
    env = {**os.environ, "APP_ENV": "test", "DATABASE_URL": settings.database.url or "",
           "DATABASE_APP_URL": settings.database.url or "", "REDIS_URL": settings.redis.url or "",
           "AUTH_KEY_PEPPER": TEST_PEPPER, "AUTH_PLATFORM_ADMIN_KEY": PLATFORM_KEY,
           "HF_HUB_OFFLINE": "1", "APP_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "app", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "the API refuses to start" in output and "is a superuser" in output, output[-3000:]
    assert "Application startup failed" in output


async def test_a_started_api_cannot_be_read_by_its_own_user(
    client: AsyncTestClient[Litestar],
) -> None:
    """Started (the session's app, in this process): not dumpable, so a document
    parser of the same user cannot read its environment or memory
    (tests/unit/test_hardening.py shows what that refuses)."""
    assert (await client.get("/healthz")).status_code == 200
    assert ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
