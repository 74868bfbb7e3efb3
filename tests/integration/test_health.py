"""Liveness and readiness, without credentials."""

from __future__ import annotations

from pathlib import Path

from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.embeddings import Models
from app.server.factory import create_app
from app.settings import Settings

Client = AsyncTestClient[Litestar]


async def test_healthz(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


async def test_readyz_reports_each_service(client: Client) -> None:
    resp = await client.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ready", "checks": {
        "postgres": "ok", "redis": "ok", "vector_store": "ok"}}


async def test_readyz_is_503_naming_the_failed_service(
    settings: Settings, models: Models, tmp_path: Path
) -> None:
    broken = settings.model_copy(deep=True)
    broken.redis.url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    broken.qdrant.path = tmp_path / "qdrant"
    async with AsyncTestClient(app=create_app(broken, models=models)) as c:
        resp = await c.get("/readyz")
    assert resp.status_code == 503
    body = resp.json()
    assert body["status"] == "not ready"
    assert body["checks"]["redis"].startswith("unreachable")
    assert body["checks"]["postgres"] == "ok" and body["checks"]["vector_store"] == "ok"


async def test_openapi_schema_is_public(client: Client) -> None:
    resp = await client.get("/docs/openapi.json")
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    assert "/admin/tenants" in paths and "/v1/keys" in paths


async def test_unknown_route_is_problem_json(client: Client) -> None:
    resp = await client.get("/healthz/nope")
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/problem+json")
