"""Fixtures the integration suites share: a fake OpenAI-compatible upstream for the
module, and the app routed to it as its only pool. A suite that needs another fake
(its own latency, token counts or context window) defines its own ``fake``; ``routed``
then uses that one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import one_pool, routed_through


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    """A fake upstream answering with four tokens, for the module."""
    with FakeServer(FakeConfig(completion_tokens=4)) as server:
        yield server


@pytest.fixture(scope="module")
async def routed(app: Litestar, client: AsyncTestClient[Litestar], settings: Settings,
                 fake: FakeServer) -> AsyncIterator[None]:
    """The app's generation routed to ``fake`` for the module (restored afterwards)."""
    async with routed_through(app, client, one_pool(fake.base_url), settings):
        yield
