"""Redis and PostgreSQL going away under traffic, and coming back: the API recovers by
itself (no restart), fails clearly meanwhile (503, never a 500), and loses nothing: every
upload ends ``ready`` exactly once with exactly its chunks in the vector store, and every
answered chat request has exactly one usage row.

The API runs as its own process (``tenantrag serve`` with worker threads, as in the
embedded stack) on a database, Redis namespace and vector-store folder of its own, and
reaches PostgreSQL and Redis through cuttable TCP proxies (``tests/faults.py``):
Dramatiq's broker and the worker runtime are process-wide, so a second in-process app
could not run workers of its own. Generation is the fast fake vLLM server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.settings import DatabaseSettings, Settings
from retrieval.vectorstore import PointFilter, VectorStoreConfig, open_vector_store
from tests.fake_openai import FakeConfig, FakeServer, free_port
from tests.faults import TcpProxy
from tests.support import (
    PLATFORM_KEY,
    bearer,
    migrated_database,
    plain_dsn,
    start_api,
    wait_healthy,
)

CUT_S = 4.0  # how long a backing service is gone
RECOVERY_S = 15.0  # how soon after it is back every request must succeed again
OPERATOR = bearer(PLATFORM_KEY)


class Stack:
    """The API process, its proxies and what it was asked."""

    def __init__(self, settings: Settings, owner_url: str, redis_url: str, folder: Path,
                 fake: FakeServer) -> None:
        self.folder, self.fake, self.owner_url = folder, fake, owner_url
        self.pg = TcpProxy.for_postgres(owner_url)
        self.redis = TcpProxy.for_redis(redis_url)
        self.settings = settings.model_copy(update={
            "database": DatabaseSettings(url=self.pg.postgres_url(owner_url)),
            "redis": settings.redis.model_copy(update={"url": self.redis.redis_url(redis_url)}),
            "worker": settings.worker.model_copy(
                update={"namespace": f"faults-{uuid.uuid4().hex[:8]}"}),
        })
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "api.log"

    async def start(self) -> None:
        await self.pg.start()
        await self.redis.start()
        self.proc = start_api(
            self.settings, self.port, self.log, WORKER_EMBEDDED="true", WORKER_THREADS="2",
            LLM_BASE_URL=self.fake.base_url, QDRANT_PATH=str(self.folder / "qdrant"),
            APP_DATA_DIR=str(self.folder / "data"), DATABASE_CONNECT_TIMEOUT_S="2",
            DATABASE_POOL_TIMEOUT_S="3", REDIS_SOCKET_TIMEOUT_S="1",
            INGEST_RELAY_INTERVAL_S="0.1", INGEST_SWEEP_INTERVAL_S="1",
            INGEST_RESEND_QUEUED_AFTER_S="5", INGEST_RESEND_PROCESSING_AFTER_S="10")
        await wait_healthy(self.url, self.proc, self.log)

    async def stop(self) -> None:
        """Stop the API (its worker threads finish what they hold)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 60)
        self.proc = None
        await self.pg.cut()
        await self.redis.cut()

    async def count_points(self, tenant_id: str, doc_id: str) -> int:
        """Points of a document in the API's embedded store (only once it has stopped)."""
        store = open_vector_store(VectorStoreConfig(backend="embedded",
                                                    path=self.folder / "qdrant"))
        try:
            return await store.count(uuid.UUID(tenant_id),
                                     PointFilter(document_id=uuid.UUID(doc_id)))
        finally:
            await store.close()

    async def usage_rows(self, tenant_id: str) -> list[asyncpg.Record]:
        """The tenant's usage events, read directly (not through the proxy)."""
        conn = await asyncpg.connect(plain_dsn(self.owner_url))
        try:
            return list(await conn.fetch(
                "SELECT request_id, status FROM usage_events WHERE tenant_id = $1 "
                "AND kind = 'chat'", uuid.UUID(tenant_id)))
        finally:
            await conn.close()

    async def document_status(self, doc_id: str) -> str:
        """A document's status, read directly (not through the proxy)."""
        conn = await asyncpg.connect(plain_dsn(self.owner_url))
        try:
            status: str = await conn.fetchval("SELECT status FROM documents WHERE id = $1",
                                              uuid.UUID(doc_id))
            return status
        finally:
            await conn.close()

    def log_tail(self) -> str:
        return self.log.read_text()[-20000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
async def fault_db(service_urls: tuple[str, str]) -> AsyncIterator[str]:
    async with migrated_database(service_urls[0], "tenantrag_faults") as url:
        yield url


@pytest.fixture
async def stack(fault_db: str, service_urls: tuple[str, str],
                settings: Settings) -> AsyncIterator[Stack]:
    folder = Path(tempfile.mkdtemp(prefix="tenantrag-faults-"))
    with FakeServer(FakeConfig(completion_tokens=5)) as fake:
        s = Stack(settings, fault_db, service_urls[1], folder, fake)
        try:
            await s.start()
            yield s
        finally:
            await s.stop()
            print(f"API log (tail):\n{s.log_tail()}")  # shown when the test failed
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Traffic:
    """Chat requests and uploads sent while a service comes and goes, with their answers."""

    http: httpx.AsyncClient
    headers: dict[str, str]
    kb_id: str
    # (sent, answered, request id, status, body) of each chat request
    chats: list[tuple[float, float, str, int, str]] = field(default_factory=list)
    uploads: dict[str, str] = field(default_factory=dict)  # filename -> document id
    upload_statuses: list[tuple[float, int]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def chat(self, stream: bool, store: bool = True,
                   request_id: str | None = None) -> tuple[int, str]:
        request_id = request_id or f"r-{uuid.uuid4().hex[:12]}"
        body = {"model": "smollm2", "user": "ann", "stream": stream, "max_tokens": 8,
                "store": store, "messages": [{"role": "user", "content": request_id}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        sent = time.monotonic()
        try:
            resp = await self.http.post("/v1/chat/completions", json=body,
                                        headers={**self.headers, "X-Request-Id": request_id})
            status, text = resp.status_code, resp.text
        except httpx.HTTPError as exc:
            status, text = 0, repr(exc)
        self.chats.append((sent, time.monotonic(), request_id, status, text))
        return status, request_id

    async def chat_loop(self) -> None:
        i = 0
        while not self.stop.is_set():
            await self.chat(stream=i % 2 == 1)
            i += 1
            await asyncio.sleep(0.05)

    async def upload(self, name: str, paragraphs: int = 24) -> None:
        """Upload a document as a client would: again (same bytes) until accepted."""
        text = "\n\n".join(f"{name} paragraph {i}: crate {i * 7} left dock {i % 5} for the "
                           f"{name} warehouse on route {i * 3}." for i in range(paragraphs))
        for _ in range(200):
            try:
                resp = await self.http.post(
                    f"/v1/knowledge-bases/{self.kb_id}/documents", headers=self.headers,
                    json={"text": text, "filename": f"{name}.txt"})
                status = resp.status_code
            except httpx.HTTPError:
                status = 0
            self.upload_statuses.append((time.monotonic(), status))
            if status in (200, 202):
                self.uploads[f"{name}.txt"] = resp.json()["data"][0]["id"]
                return
            assert status in (0, 503), resp.text
            await asyncio.sleep(0.3)
        raise AssertionError(f"{name} never accepted")

    async def upload_loop(self, stem: str) -> None:
        i = 0
        while not self.stop.is_set():
            await self.upload(f"{stem}-{i}")
            i += 1
            await asyncio.sleep(0.4)


@contextlib.asynccontextmanager
async def tenant_traffic(stack: Stack) -> AsyncIterator[tuple[Traffic, str]]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        resp = await http.post("/admin/tenants", headers=OPERATOR, json={
            "slug": f"f-{uuid.uuid4().hex[:10]}", "name": "Faults", "tier": "pro",
            "rpm_limit": 10**6, "tpm_limit": 10**9, "max_concurrency": 1000})
        assert resp.status_code == 201, resp.text
        tenant_id = resp.json()["id"]
        key = (await http.post(f"/admin/tenants/{tenant_id}/keys", headers=OPERATOR, json={
            "name": "all", "scopes": ["admin", "chat", "ingest"]})).json()["key"]
        kb = await http.post("/v1/knowledge-bases", headers=bearer(key), json={"name": "kb"})
        assert kb.status_code == 201, kb.text
        yield Traffic(http, bearer(key), kb.json()["id"]), tenant_id


async def recovered(traffic: Traffic) -> float:
    """Seconds until chat answers again after a restore (at most RECOVERY_S)."""
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_S:
        if (await traffic.chat(stream=False))[0] == 200:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError("the API did not recover without a restart")


async def assert_nothing_lost(stack: Stack, traffic: Traffic, tenant_id: str) -> None:
    """Every upload ready exactly once with exactly its chunks; every answered chat
    request metered exactly once."""
    docs: list[dict[str, Any]] = []
    for _ in range(600):
        page = (await traffic.http.get(f"/v1/knowledge-bases/{traffic.kb_id}/documents",
                                       headers=traffic.headers, params={"limit": 500})).json()
        docs = page["data"]
        if docs and all(d["status"] in ("ready", "failed") for d in docs):
            break
        await asyncio.sleep(0.2)
    names = sorted(d["filename"] for d in docs)
    assert names == sorted(traffic.uploads), "an upload is missing or duplicated"
    assert {d["id"] for d in docs} == set(traffic.uploads.values())
    assert [d for d in docs if d["status"] != "ready"] == [], stack.log_tail()
    answered = [rid for _, _, rid, status, _ in traffic.chats if status == 200]
    rows: list[asyncpg.Record] = []
    for _ in range(150):  # usage is written behind the answer (retrying through outages)
        rows = await stack.usage_rows(tenant_id)
        if len(rows) >= len(answered):
            break
        await asyncio.sleep(0.2)
    metered = [r["request_id"] for r in rows]
    assert sorted(rid for rid in metered if rid in answered) == sorted(answered), (
        "an answered request has no usage row")
    assert len(metered) == len(set(metered)), "a request was metered twice"
    await stack.stop()
    for doc in docs:
        assert await stack.count_points(tenant_id, doc["id"]) == doc["chunk_count"], doc


async def slow_requests(stack: Stack, traffic: Traffic,
                        store: bool = True) -> list[asyncio.Future[tuple[int, str]]]:
    """Chat requests (whole and streamed) that have reached the upstream, which answers
    them in two seconds."""
    stack.fake.config.ttft_s = 2.0
    ids = [f"slow-{uuid.uuid4().hex[:12]}" for _ in range(4)]
    in_flight: list[asyncio.Future[tuple[int, str]]] = [
        asyncio.ensure_future(traffic.chat(stream=i % 2 == 1, store=store, request_id=rid))
        for i, rid in enumerate(ids)]
    deadline = time.monotonic() + 20
    while not all(any(rid in str(b) for b in stack.fake.stats.bodies[-50:]) for rid in ids):
        assert time.monotonic() < deadline, "the requests never reached the upstream"
        await asyncio.sleep(0.02)
    return in_flight


def during(traffic: Traffic, start: float, end: float) -> list[int]:
    """Statuses of the chat requests sent and answered within ``[start, end]``."""
    return [status for sent, done, _, status, _ in traffic.chats
            if start <= sent and done <= end]


async def test_redis_restarted_under_traffic(stack: Stack) -> None:
    async with tenant_traffic(stack) as (traffic, tenant_id):
        loops = [asyncio.ensure_future(traffic.chat_loop()),
                 asyncio.ensure_future(traffic.upload_loop("redis"))]
        await asyncio.sleep(1.5)
        # Admitted before the cut, answered during it (settled without Redis).
        in_flight = await slow_requests(stack, traffic)
        cut_at = time.monotonic()
        await stack.redis.cut()
        stack.fake.config.ttft_s = 0.0
        await asyncio.sleep(CUT_S)
        await stack.redis.start()
        back_at = time.monotonic()
        took = await recovered(traffic)
        await asyncio.sleep(1.0)
        traffic.stop.set()
        await asyncio.gather(*loops)
        assert [s for s, _ in await asyncio.gather(*in_flight)] == [200] * 4
        # Before the cut everything answered; during it chat failed closed, clearly.
        assert set(during(traffic, 0, cut_at)) == {200}
        cut = during(traffic, cut_at + 0.5, back_at)
        assert cut and set(cut) == {503}, cut
        refused = [b for _, t, _, s, b in traffic.chats if s == 503 and cut_at <= t <= back_at]
        assert all("rate limiter" in b for b in refused), refused[:1]
        # Uploads went on: accepted and queued in PostgreSQL, sent on once Redis was back.
        assert {s for t, s in traffic.upload_statuses if cut_at <= t <= back_at} == {202}
        assert not [s for _, _, _, s, _ in traffic.chats if s not in (200, 503)]
        assert took < RECOVERY_S
        await assert_nothing_lost(stack, traffic, tenant_id)


async def test_postgres_restarted_under_traffic(stack: Stack) -> None:
    async with tenant_traffic(stack) as (traffic, tenant_id):
        await traffic.upload("before")
        # Requests the upstream answers while PostgreSQL is away: their usage is
        # written behind the answer, and must survive the outage.
        in_flight = await slow_requests(stack, traffic)
        await traffic.upload("big", paragraphs=300)  # ingesting across the cut
        big_id = traffic.uploads["big.txt"]
        await asyncio.sleep(0.5)
        cut_at = time.monotonic()
        await stack.pg.cut()
        stack.fake.config.ttft_s = 0.0
        loops = [asyncio.ensure_future(traffic.chat_loop()),
                 asyncio.ensure_future(traffic.upload_loop("pg"))]
        kb_reads: list[int] = []
        while time.monotonic() - cut_at < CUT_S:
            kb_reads.append((await traffic.http.get(
                f"/v1/knowledge-bases/{traffic.kb_id}", headers=traffic.headers)).status_code)
            await asyncio.sleep(0.3)
        answered_in_cut = await asyncio.gather(*in_flight)
        # Answered while PostgreSQL is away: metered once it is back, not before.
        assert not {r["request_id"] for r in await stack.usage_rows(tenant_id)} & {
            rid for _, rid in answered_in_cut}
        assert await stack.document_status(big_id) in ("queued", "processing")
        await stack.pg.start()
        back_at = time.monotonic()
        took = await recovered(traffic)
        traffic.stop.set()
        await asyncio.gather(*loops)
        assert [status for status, _ in answered_in_cut] == [200] * 4, answered_in_cut
        cut = during(traffic, cut_at + 0.5, back_at)
        assert cut and set(cut) == {503}, cut
        assert set(kb_reads[2:]) == {503}, kb_reads
        assert 503 in {s for t, s in traffic.upload_statuses if cut_at + 0.5 <= t <= back_at}
        assert not [s for _, _, _, s, _ in traffic.chats if s not in (200, 503)]
        assert took < RECOVERY_S
        await assert_nothing_lost(stack, traffic, tenant_id)

