"""Shutdown waits for the writes chat leaves behind its answers: an app of its own
(real PostgreSQL and Redis, generation on a fake vLLM server; its lifespan on the test's
event loop, as under uvicorn) is stopped while a usage event is still being written, and
the event is in PostgreSQL afterwards, as is the usage event of the last chat request
answered before the stop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.domain.chat.background import BackgroundWrites
from app.embeddings import Models
from app.quotas.usage import CHAT, UsageService
from app.quotas.usage_writer import UsageRow
from app.server.factory import create_app
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import UNLIMITED, bearer, create_key, create_tenant, owner_rows

WRITE_DELAY_S = 0.5  # longer than the rest of shutdown takes without waiting


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=4)) as server:
        yield server


def own_app(settings: Settings, models: Models, fake_llm: FakeServer, qdrant: Path) -> Litestar:
    own = settings.model_copy(update={
        "llm": settings.llm.model_copy(update={"base_url": fake_llm.base_url}),
        "dispatch": settings.dispatch.model_copy(update={"prices": None}),
        "qdrant": settings.qdrant.model_copy(update={"path": qdrant}),
    })
    return create_app(own, models=models)


async def test_shutdown_waits_for_the_usage_events_still_being_written(
    client: AsyncTestClient[Litestar], settings: Settings, models: Models,
    fake_llm: FakeServer, admin_headers: dict[str, str], tmp_path: Path,
) -> None:
    tenant = await create_tenant(client, admin_headers, **UNLIMITED)
    key = (await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"]
    app = own_app(settings, models, fake_llm, tmp_path / "qdrant")
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]  # Litestar's ASGI types
    async with app.lifespan(), httpx.AsyncClient(transport=transport,
                                                 base_url="http://app") as http:
        answered = await http.post("/v1/chat/completions", headers=bearer(key), json={
            "model": "smollm2", "max_tokens": 8, "store": False,
            "retrieval": {"enabled": False},
            "messages": [{"role": "user", "content": "how many days off do I get?"}]})
        assert answered.status_code == 200, answered.text
        background: BackgroundWrites = app.state.background
        usage = UsageService(app.state.db, app.state.usage_writer)
        late_id = f"late-{uuid.uuid4().hex}"

        async def late_write() -> None:  # as a settlement's usage event, only slower
            await asyncio.sleep(WRITE_DELAY_S)
            await usage.record(UsageRow(tenant_id=uuid.UUID(tenant["id"]),
                                        request_id=late_id, kind=CHAT, model="smollm2",
                                        status="ok", prompt_tokens=3, completion_tokens=4))

        background.start(late_write())
        assert background.pending >= 1
    # The lifespan has closed the usage writer and the database pool: after the write.
    assert background.pending == 0
    rows = await owner_rows(settings, "usage_events", tenant["id"])
    assert {r["request_id"] for r in rows} >= {late_id, answered.json()["id"]}
    late = next(r for r in rows if r["request_id"] == late_id)
    assert (late["prompt_tokens"], late["completion_tokens"]) == (3, 4)


async def test_close_cancels_what_is_left_after_its_timeout() -> None:
    background = BackgroundWrites()
    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = background.start(stuck())
    await started.wait()
    await background.close(timeout_s=0.1)
    assert task.cancelled() and background.pending == 0
