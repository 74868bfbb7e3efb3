"""Test bootstrap: real PostgreSQL and Redis, from the environment or embedded.

With ``DATABASE_URL`` and ``REDIS_URL`` set (as CI does), tests use those servers; else
they start the embedded ones in a temporary folder. Either way the suite works in a
scratch database of its own, created here and dropped at the end, so a developer's data
is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from pydantic import SecretStr

from app.devstack.embedded import EmbeddedStack
from app.embeddings import Models, load_models
from app.server.factory import create_app
from app.settings import (
    AuthSettings,
    DatabaseSettings,
    DispatchSettings,
    IngestSettings,
    QdrantSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    WorkerSettings,
    as_asyncpg_url,
)
from tests.support import (
    EMBEDDING_PRICES,
    PLATFORM_KEY,
    TEST_PEPPER,
    migrated_database,
    watched,
)
from workers.embedded import embedded_workers

pytest_plugins = ["tests.llm_server"]  # the session's vLLM server (started on first use)


@pytest.fixture(scope="session")
def service_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(owner database URL, Redis URL) of real servers for the whole run."""
    db_url, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if db_url and redis_url:
        yield as_asyncpg_url(db_url), redis_url
        return
    # Not under pytest's tmp folder: a concurrent pytest run resets it to 0700, which
    # locks out the unprivileged user PostgreSQL runs as when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="tenantrag-stack-"))
    stack = EmbeddedStack(folder)
    endpoints = stack.start()
    try:
        yield db_url or endpoints.database_url, redis_url or endpoints.redis_url
    finally:
        stack.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
async def scratch_database(service_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh database on the server, migrated to head; dropped afterwards."""
    async with migrated_database(service_urls[0], "tenantrag_test") as url:
        yield url


@pytest.fixture(scope="session")
def settings(
    scratch_database: str, service_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """Settings pointing at the scratch database, real Redis and a temporary vector store."""
    data = tmp_path_factory.mktemp("data")
    return Settings(
        server=ServerSettings(env="test", data_dir=data),
        database=DatabaseSettings(url=scratch_database),
        redis=RedisSettings(url=service_urls[1]),
        qdrant=QdrantSettings(path=data / "qdrant"),
        # A namespace of its own: a shared Redis may hold other runs' messages.
        worker=WorkerSettings(embedded=True, threads=2, namespace=f"test-{uuid.uuid4().hex[:8]}"),
        # Hostile files fail sooner than by default (60 s, 1024 MiB): the tests' own
        # files parse in well under a second and 100 MiB.
        ingest=IngestSettings(relay_interval_s=0.05, sweep_interval_s=1.0,
                              stale_version_grace_s=1.0, parse_timeout_s=15,
                              parse_memory_mb=512),
        # Embedding tokens are priced (the metering tests check the cost of ingestion).
        dispatch=DispatchSettings(prices=EMBEDDING_PRICES),
        auth=AuthSettings(
            key_pepper=SecretStr(TEST_PEPPER),
            platform_admin_key=SecretStr(PLATFORM_KEY),
            last_used_resolution_s=0,
        ),
    )


@pytest.fixture(scope="session")
def models() -> Models:
    """The real embedding model and tokenizer, loaded once for the whole run."""
    return load_models(IngestSettings())


@pytest.fixture(scope="session")
def app(settings: Settings, models: Models) -> Litestar:
    """The API as users get it, with in-process worker threads (as in ``make run``)."""
    return watched(create_app(settings, extra_lifespans=[embedded_workers(settings)],
                              models=models))


@pytest.fixture(scope="session")
async def client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """An HTTP client running the app's lifespan once for the session."""
    async with AsyncTestClient(app=app) as c:
        yield c


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    """The platform operator's credentials."""
    return {"Authorization": f"Bearer {PLATFORM_KEY}"}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's top folder."""
    return Path(__file__).resolve().parent.parent
