"""Helpers the tests share: creating tenants and keys through the public API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import uvicorn
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.db.migrate import migrate
from app.domain.chat.background import BackgroundWrites
from app.inference.dispatcher import Dispatcher
from app.inference.pools import PoolConfig, PoolsConfig
from app.server.clients import cache_salt_key
from app.server.http_protocol import OneWriteHttpToolsProtocol
from app.settings import DatabaseSettings, DispatchSettings, Settings, as_asyncpg_url

PLATFORM_KEY = "test-platform-admin-key-0123456789abcdef"
TEST_PEPPER = "test-pepper-0123456789abcdef0123456789"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_PRICE_PER_MTOK = "0.02"
EMBEDDING_PRICES = f'{{"{EMBEDDING_MODEL}": {{"prompt_per_mtok": {EMBEDDING_PRICE_PER_MTOK}}}}}'

# Limits high enough never to refuse a test's requests, but set: the limiter runs.
UNLIMITED = {"rpm_limit": 10**6, "tpm_limit": 10**9, "max_concurrency": 10**4,
             "monthly_token_budget": 10**12}

def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def migrated_database(owner_url: str, prefix: str) -> AsyncIterator[str]:
    """A fresh database on the server (``prefix`` + a random suffix), migrated to head;
    its URL. Dropped afterwards, connections and all."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(plain_dsn(owner_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(owner_url, name)
    try:
        await migrate(DatabaseSettings(url=url))
        yield url
    finally:
        admin = await asyncpg.connect(plain_dsn(owner_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def plain_dsn(url: str) -> str:
    """asyncpg's own DSN form (no SQLAlchemy driver suffix)."""
    return "postgresql://" + as_asyncpg_url(url).partition("://")[2]


def unique_slug(stem: str = "t") -> str:
    """A slug no other test uses."""
    return f"{stem}-{uuid.uuid4().hex[:12]}"


async def create_tenant(
    client: AsyncTestClient[Litestar], admin_headers: dict[str, str], **fields: Any
) -> dict[str, Any]:
    """Create a tenant through the admin API and return its JSON."""
    body = {"slug": unique_slug(), "name": "Test tenant", "tier": "pro", **fields}
    resp = await client.post("/admin/tenants", json=body, headers=admin_headers)
    assert resp.status_code == 201, resp.text
    result: dict[str, Any] = resp.json()
    return result


async def create_key(
    client: AsyncTestClient[Litestar],
    admin_headers: dict[str, str],
    tenant_id: str,
    scopes: list[str],
) -> dict[str, Any]:
    """Mint a key for a tenant through the admin API; the JSON includes ``key``."""
    resp = await client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"name": "test", "scopes": scopes},
        headers=admin_headers,
    )
    assert resp.status_code == 201, resp.text
    result: dict[str, Any] = resp.json()
    return result


def bearer(key: str) -> dict[str, str]:
    """Authorization header for a key."""
    return {"Authorization": f"Bearer {key}"}


def one_pool(*urls: str, name: str = "default", models: tuple[str, ...] = ("smollm2",),
             **fields: Any) -> PoolsConfig:
    """A pools configuration of one shared pool at ``urls``."""
    return PoolsConfig(pools=[PoolConfig(name=name, models=list(models), endpoints=list(urls),
                                         **fields)])


async def install_dispatcher(app: Litestar, client: AsyncTestClient[Litestar],
                             pools: PoolsConfig, settings: Settings,
                             dispatch: DispatchSettings | None = None) -> Dispatcher:
    """Route the running app's generation through ``pools``. The dispatcher starts (its
    health loop) on the app's own event loop."""
    d = Dispatcher(pools, dispatch or settings.dispatch, settings.llm, cache_salt_key(settings))
    await asyncio.wrap_future(client.blocking_portal.start_task_soon(d.start))
    app.state.dispatcher = d
    return d


async def remove_dispatcher(app: Litestar, client: AsyncTestClient[Litestar],
                            dispatcher: Dispatcher) -> None:
    """Undo :func:`install_dispatcher`."""
    if app.state.dispatcher is dispatcher:
        app.state.dispatcher = None
    await asyncio.wrap_future(client.blocking_portal.start_task_soon(dispatcher.close))


@contextlib.asynccontextmanager
async def routed_through(app: Litestar, client: AsyncTestClient[Litestar], pools: PoolsConfig,
                         settings: Settings) -> AsyncIterator[Dispatcher]:
    """The running app generating through ``pools`` for a while; then as it was."""
    before = app.state.dispatcher
    d = await install_dispatcher(app, client, pools, settings)
    try:
        yield d
    finally:
        await remove_dispatcher(app, client, d)
        app.state.dispatcher = before


async def owner_rows(settings: Settings, table: str, tenant_id: str) -> list[asyncpg.Record]:
    """A tenant's rows of ``table``, oldest first, read as the owner (no RLS), once the
    app has written what it writes behind its answers."""
    await metering_done()
    conn = await asyncpg.connect(plain_dsn(settings.database.owner_url()))
    try:
        return list(await conn.fetch(f"SELECT * FROM {table} WHERE tenant_id = $1 ORDER BY id",
                                     uuid.UUID(tenant_id)))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def served_over_http(app: Litestar,
                           client: AsyncTestClient[Litestar]) -> AsyncIterator[str]:
    """The app served over real HTTP by uvicorn, on the event loop where the test client
    ran the app's lifespan (its database pool and clients live there); the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning",
                                           http=OneWriteHttpToolsProtocol))  # as `serve`
    running = client.blocking_portal.start_task_soon(server.serve)
    while not server.started:
        assert not running.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(running.result, 15)


def watched(app: Litestar) -> Litestar:
    """``app``, whose writes behind its answers :func:`metering_done` waits for."""
    _WATCHED.append(app)
    return app


_WATCHED: list[Litestar] = []  # the test session's apps (conftest's ``app``)


def _pending_writes(app: Litestar) -> int:
    background: BackgroundWrites | None = app.state.get("background")
    return background.pending if background is not None else 0


async def metering_done(timeout_s: float = 10.0) -> None:
    """Wait until the app has written every pending usage event and conversation turn
    (they are written behind the answer)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while any(_pending_writes(app) for app in _WATCHED):
        assert asyncio.get_running_loop().time() < deadline, "metering did not finish"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def concurrent_client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for many requests at once against the app served over HTTP (the
    test client runs one request at a time)."""
    # Idle connections are dropped well before uvicorn closes them (its keep-alive is 5 s,
    # httpx's default too): reusing one the server is closing that instant is a ReadError.
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as c:
        yield c


def start_api(settings: Settings, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Another API process (``tenantrag serve``) on the suite's database and Redis."""
    full = {**os.environ, "APP_ENV": "test", "DATABASE_URL": settings.database.url or "",
            "REDIS_URL": settings.redis.url or "", "AUTH_KEY_PEPPER": TEST_PEPPER,
            "AUTH_PLATFORM_ADMIN_KEY": PLATFORM_KEY,
            "WORKER_NAMESPACE": settings.worker.namespace, "HF_HUB_OFFLINE": "1",
            "APP_DATA_DIR": str(log.parent / f"data-{port}"), **env}
    tenantrag = str(Path(sys.executable).parent / "tenantrag")
    return subprocess.Popen([tenantrag, "serve", "--port", str(port)], env=full,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``url``/healthz answers (the process must not exit meanwhile)."""
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"the API process exited; see {log}")
            try:
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not come up; see {log}")
