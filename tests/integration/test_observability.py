"""Request ids and structured logs on the real app (real PostgreSQL and Redis): every
response carries ``X-Request-Id`` (the client's, when valid), and the JSON log line of a
request names that id and the tenant its key belongs to."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.logs import log_handler
from app.settings import ServerSettings
from tests.support import bearer, create_key, create_tenant

Client = AsyncTestClient[Litestar]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the app logs while the test runs, as the production JSON handler writes it."""
    stream = io.StringIO()
    handler = log_handler(ServerSettings(log_format="json"), stream)
    root, access = logging.getLogger(), logging.getLogger("tenantrag.access")
    level = access.level
    access.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        access.setLevel(level)


def access_lines(stream: io.StringIO, path: str) -> list[dict[str, Any]]:
    """The parsed access log lines of requests to ``path``."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == "tenantrag.access"
            and line.get("path") == path]


@pytest.fixture
async def tenant_key(client: Client, admin_headers: dict[str, str]) -> tuple[str, str]:
    """(tenant id, admin key) of a new tenant."""
    tenant = await create_tenant(client, admin_headers)
    key = await create_key(client, admin_headers, tenant["id"], ["admin"])
    return tenant["id"], key["key"]


async def test_an_authenticated_request_logs_its_request_id_and_tenant_as_json(
    client: Client, tenant_key: tuple[str, str], json_log: io.StringIO,
) -> None:
    tenant_id, key = tenant_key
    resp = await client.get("/v1/tenant", headers={**bearer(key), "X-Request-Id": "ui-7f3a.1"})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "ui-7f3a.1"  # echoed
    [line] = access_lines(json_log, "/v1/tenant")
    assert line["request_id"] == "ui-7f3a.1"
    assert line["tenant_id"] == tenant_id
    assert line["method"] == "GET" and line["status"] == 200 and line["level"] == "INFO"
    assert line["duration_ms"] >= 0 and line["timestamp"]


async def test_without_a_valid_request_id_the_app_makes_one_and_logs_it(
    client: Client, tenant_key: tuple[str, str], json_log: io.StringIO,
) -> None:
    _, key = tenant_key
    plain = await client.get("/v1/knowledge-bases", headers=bearer(key))
    bad = await client.get("/v1/knowledge-bases",
                           headers={**bearer(key), "X-Request-Id": "not valid!"})
    ids = [plain.headers["x-request-id"], bad.headers["x-request-id"]]
    assert len(set(ids)) == 2 and "not valid!" not in ids
    assert all(len(i) == 32 for i in ids)
    logged = [line["request_id"] for line in access_lines(json_log, "/v1/knowledge-bases")]
    assert logged == ids


async def test_refused_requests_carry_the_request_id_too(
    client: Client, tenant_key: tuple[str, str], json_log: io.StringIO,
) -> None:
    _, key = tenant_key
    # Refused by the authentication middleware, before any route runs.
    unauthenticated = await client.get("/v1/tenant", headers={"X-Request-Id": "no-key-1"})
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers.get_list("x-request-id") == ["no-key-1"]
    [line] = access_lines(json_log, "/v1/tenant")
    assert line["request_id"] == "no-key-1" and line["status"] == 401
    assert line["tenant_id"] is None
    # Refused inside a route: one header, not two.
    missing = await client.get("/v1/knowledge-bases/00000000-0000-0000-0000-000000000000",
                               headers={**bearer(key), "X-Request-Id": "kb-404"})
    assert missing.status_code == 404
    assert missing.headers.get_list("x-request-id") == ["kb-404"]
