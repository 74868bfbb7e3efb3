"""Ingestion is shared fairly and budgeted, through the real app (HTTP API, outbox relay,
Dramatiq on Redis, the embedded worker threads, PostgreSQL):

- a tenant with a long queue does not delay another tenant's upload by more than the
  few documents it already has in flight;
- a monthly quota on embedding tokens: queued documents past it end ``failed`` with the
  reason, and uploads are refused with 429 ``quota_exceeded`` once it is used up;
- a ZIP whose directory holds too many entries is refused at upload, naming the bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.files import make_zip_directory
from tests.integration.test_ingestion import Tenant, new_tenant, upload, wait_done
from tests.support import owner_rows, plain_dsn

Client = AsyncTestClient[Litestar]
QUEUED = 200  # tenant A's backlog
PARAGRAPHS = 10  # ~20 chunks a document: each takes the two worker threads a while
B_WITHIN_S = 90.0


def handbook(tag: str, number: int, paragraphs: int = PARAGRAPHS) -> bytes:
    """A distinct, sizeable markdown document (distinct bytes: no deduplication)."""
    parts = [f"# {tag} handbook {number}"]
    for p in range(paragraphs):
        words = " ".join(f"{tag}{number}w{p}x{i}" for i in range(45))
        parts.append(f"## Section {p}\n\nRule {number}.{p}: {words}.")
    return "\n\n".join(parts).encode()


async def count(client: Client, t: Tenant, status: str) -> int:
    resp = await client.get(t.docs_url, headers=t.headers, params={"status": status,
                                                                   "limit": 1})
    assert resp.status_code == 200, resp.text
    total: int = resp.json()["total"]
    return total


async def test_one_tenants_backlog_does_not_starve_another_tenants_upload(
    client: Client, admin_headers: dict[str, str]
) -> None:
    a = await new_tenant(client, admin_headers)
    b = await new_tenant(client, admin_headers)
    for start in range(0, QUEUED, 20):  # the per-request file limit
        files = [(f"a{n}.md", handbook("alpha", n)) for n in range(start, start + 20)]
        assert (await upload(a, client, files)).status_code == 202
    queued_at = time.monotonic()
    resp = await upload(b, client, [("b.md", handbook("beta", 0))])
    assert resp.status_code == 202, resp.text
    doc = resp.json()["data"][0]
    try:
        deadline = time.monotonic() + B_WITHIN_S
        while (await client.get(f"{b.docs_url}/{doc['id']}", headers=b.headers)
               ).json()["status"] != "ready":
            a_ready = await count(client, a, "ready")
            assert time.monotonic() < deadline, (
                f"B's document not ready after {B_WITHIN_S:.0f} s; A has {a_ready} ready")
            await asyncio.sleep(0.1)
        a_ready = await count(client, a, "ready")
        waited = time.monotonic() - queued_at
        print(f"B ready after {waited:.1f} s, when {a_ready} of A's {QUEUED} were ready")
        # The fair share is 2 x WORKER_THREADS = 4 in flight: B waits for those only.
        assert a_ready <= 8, a_ready
        assert await count(client, a, "queued") >= QUEUED - 20  # A's backlog is still there
    finally:  # A's backlog ends with its knowledge base (its messages become no-ops)
        await client.delete(f"/v1/knowledge-bases/{a.kb['id']}", headers=a.headers)


async def embedded_tokens(settings: Settings, t: Tenant) -> int:
    rows = await owner_rows(settings, "usage_events", str(t.id))
    return sum(r["prompt_tokens"] for r in rows if r["kind"] == "embedding")


async def set_quota(client: Client, admin: dict[str, str], t: Tenant, tokens: int) -> None:
    resp = await client.patch(f"/admin/tenants/{t.id}", headers=admin,
                              json={"monthly_embedding_tokens": tokens})
    assert resp.status_code == 200, resp.text
    assert resp.json()["monthly_embedding_tokens"] == tokens


async def test_embedding_quota_fails_queued_documents_then_refuses_uploads(
    client: Client, admin_headers: dict[str, str], settings: Settings
) -> None:
    t = await new_tenant(client, admin_headers, monthly_embedding_tokens=10**6)
    probe = (await upload(t, client, [("probe.md", handbook("probe", 0, 4))])).json()["data"][0]
    assert (await wait_done(client, t, probe["id"]))["status"] == "ready"
    one_doc = await embedded_tokens(settings, t)
    # Room for two and a half more documents like it; five are queued at once.
    await set_quota(client, admin_headers, t, one_doc + one_doc * 5 // 2)
    resp = await upload(t, client, [(f"q{n}.md", handbook("probe", n, 4)) for n in range(1, 6)])
    assert resp.status_code == 202, resp.text
    done = [await wait_done(client, t, d["id"]) for d in resp.json()["data"]]
    ready = [d for d in done if d["status"] == "ready"]
    failed = [d for d in done if d["status"] == "failed"]
    assert len(ready) + len(failed) == 5 and 2 <= len(ready) <= 3, done
    for d in failed:  # never silently stuck: the reason says which quota and when it resets
        assert "monthly_embedding_tokens" in d["error"] and "resets at" in d["error"], d
        assert d["chunks_embedded"] == 0  # refused before any embedding work
    used = await embedded_tokens(settings, t)
    # Checked before embedding; two worker threads: at most one document's overshoot.
    assert used <= one_doc + one_doc * 5 // 2 + one_doc * 11 // 10, (used, one_doc)

    await set_quota(client, admin_headers, t, used)  # used up: uploads are refused
    resp = await upload(t, client, [("late.md", handbook("late", 0, 4))])
    assert resp.status_code == 429, resp.text
    body: dict[str, Any] = resp.json()
    assert body["code"] == "quota_exceeded" and body["quota"] == "monthly_embedding_tokens"
    assert body["used"] == used and body["limit"] == used and body["resets_at"].endswith(
        "T00:00:00Z")
    assert int(resp.headers["Retry-After"]) > 0
    assert await count(client, t, "queued") == 0  # nothing of the refused upload was stored

    await set_quota(client, admin_headers, t, used + 10 * one_doc)  # raised: accepted again
    assert (await upload(t, client, [("late.md", handbook("late", 0, 4))])).status_code == 202
    # A document refused by the quota is retried when its bytes are uploaded again.
    name = failed[0]["filename"]
    resp = await upload(t, client, [(name, handbook("probe", int(name[1:-3]), 4))])
    assert resp.status_code == 202, resp.text
    again = resp.json()["data"][0]
    assert again["id"] == failed[0]["id"] and not again["duplicate"]
    assert (await wait_done(client, t, again["id"]))["status"] == "ready"


async def test_the_tier_default_embedding_quota_applies_until_overridden(
    client: Client, admin_headers: dict[str, str], settings: Settings
) -> None:
    t = await new_tenant(client, admin_headers, tier="free")
    assert t.info["monthly_embedding_tokens"] is None  # the tier's default: 5M for free
    conn = await asyncpg.connect(plain_dsn(settings.database.owner_url()))
    try:  # a month's ingestion already metered, up to the free tier's quota
        await conn.execute(
            "INSERT INTO usage_events (tenant_id, request_id, kind, model, prompt_tokens, "
            "latency_ms, status, created_at) VALUES ($1, 'ingest:earlier', 'embedding', "
            "'m', 5000000, 0, 'ok', now())", t.id)
    finally:
        await conn.close()
    resp = await upload(t, client, [("more.md", handbook("more", 0, 2))])
    assert resp.status_code == 429, resp.text
    assert resp.json()["limit"] == 5_000_000 and resp.json()["used"] == 5_000_000
    await set_quota(client, admin_headers, t, 6_000_000)  # the operator's override wins
    assert (await upload(t, client, [("more.md", handbook("more", 0, 2))])).status_code == 202


async def test_a_zip_with_too_many_directory_entries_is_refused_at_upload(
    client: Client, admin_headers: dict[str, str]
) -> None:
    t = await new_tenant(client, admin_headers)
    for records, claimed in ((1000, 10_000_000), (100_000, 1)):
        started = time.monotonic()
        resp = await upload(t, client, [("many.docx", make_zip_directory(records, claimed))])
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert f"{max(records, claimed):,} entries" in detail, detail
        assert "'many.docx'" in detail and "the limit is 10,000" in detail
        assert time.monotonic() - started < 5  # zipfile listing 100k records took seconds
    assert await count(client, t, "queued") == 0
