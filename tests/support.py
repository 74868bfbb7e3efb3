"""Helpers the tests share: creating tenants and keys through the public API."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.settings import as_asyncpg_url

PLATFORM_KEY = "test-platform-admin-key-0123456789abcdef"
TEST_PEPPER = "test-pepper-0123456789abcdef0123456789"


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


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
