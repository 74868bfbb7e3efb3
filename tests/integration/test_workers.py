"""Dramatiq worker threads inside the API process, over the real Redis broker."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from app.api.factory import create_app
from app.settings import Settings
from workers import broker as broker_module
from workers.embedded import embedded_workers


async def test_embedded_workers_run_actors_during_app_lifetime(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings.model_copy(deep=True)
    s.worker.namespace = f"test-{uuid.uuid4().hex[:8]}"
    s.qdrant.path = tmp_path / "qdrant"
    monkeypatch.setattr(broker_module, "ACTOR_MODULES", ("tests.integration.echo_actors",))
    assert s.redis.url is not None
    key, value = f"echo:{uuid.uuid4().hex}", "processed"
    app = create_app(s, extra_lifespans=[embedded_workers(s)])
    reader = aioredis.Redis.from_url(s.redis.url)
    try:
        async with AsyncTestClient(app=app):
            from tests.integration.echo_actors import record_echo

            record_echo.send(s.redis.url, key, value)
            for _ in range(100):
                if await reader.get(key) is not None:
                    break
                await asyncio.sleep(0.1)
            assert await reader.get(key) == value.encode()
    finally:
        await reader.aclose()
