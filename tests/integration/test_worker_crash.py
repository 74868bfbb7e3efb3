"""A worker process killed mid-ingest: the document still ends ``ready`` exactly once,
with exactly one point per chunk (no duplicates), processed by a second worker.

Runs ``tenantrag worker`` as real separate processes against its own scratch database,
Redis namespace and vector-store folder, so nothing else in the test run interferes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from app.auth.principal import CLI
from app.db.engine import Database, make_engine
from app.db.models import Document, Tenant, Tier
from app.domain.knowledge.document_service import DocumentService, IncomingFile
from app.domain.knowledge.kb_service import KnowledgeBaseService
from app.domain.knowledge.pipeline import LEASE_KEY_SQL, lease_key
from app.domain.knowledge.schemas import KnowledgeBaseCreate
from app.settings import DatabaseSettings, IngestSettings
from retrieval.vectorstore import PointFilter, VectorStoreConfig, open_vector_store
from tests.support import TEST_PEPPER, migrated_database

PARAGRAPHS = 1200  # ~200 chunks: embedding takes many seconds on 2 cores


@pytest.fixture
async def crash_db(service_urls: tuple[str, str]) -> AsyncIterator[str]:
    async with migrated_database(service_urls[0], "tenantrag_crash") as url:
        yield url


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "app", "worker", "--threads", "1"],
                            env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def count_points(folder: Path, tenant_id: uuid.UUID, doc_id: uuid.UUID) -> int:
    """Open the worker's embedded store (only while no worker holds it) and count."""
    store = open_vector_store(VectorStoreConfig(backend="embedded", path=folder / "qdrant"))
    try:
        return await store.count(tenant_id, PointFilter(document_id=doc_id))
    finally:
        await store.close()


async def status_of(db: Database, tenant_id: uuid.UUID, doc_id: uuid.UUID) -> Document:
    async with db.tenant(tenant_id) as s:
        doc = await s.get(Document, doc_id)
    assert doc is not None
    return doc


async def wait_for(db: Database, tenant_id: uuid.UUID, doc_id: uuid.UUID,
                   done: Callable[[Document], bool], within_s: float, log: Path) -> Document:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        doc = await status_of(db, tenant_id, doc_id)
        if done(doc):
            return doc
        await asyncio.sleep(0.1)
    tail = log.read_text()[-4000:]  # noqa: ASYNC240  (a failing test's last words)
    pytest.fail(f"document never got there; worker log:\n{tail}")


async def test_killed_worker_mid_ingest_recovers_without_duplicates(
    crash_db: str, service_urls: tuple[str, str]
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="tenantrag-crash-"))
    env = {**os.environ, "APP_ENV": "test", "DATABASE_URL": crash_db,
           "REDIS_URL": service_urls[1], "QDRANT_PATH": str(folder / "qdrant"),
           "WORKER_NAMESPACE": f"crash-{uuid.uuid4().hex[:8]}", "AUTH_KEY_PEPPER": TEST_PEPPER,
           "INGEST_RESEND_PROCESSING_AFTER_S": "2", "INGEST_SWEEP_INTERVAL_S": "1",
           "INGEST_RELAY_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": "1"}
    db = Database(make_engine(DatabaseSettings(url=crash_db).application_url(),
                              DatabaseSettings(url=crash_db)))
    log = folder / "worker.log"
    try:
        async with db.platform() as s:
            tenant = Tenant(slug="crash", name="Crash", tier=Tier.pro)
            s.add(tenant)
        kb = await KnowledgeBaseService(db).create(tenant.id, KnowledgeBaseCreate(name="kb"),
                                                   CLI)
        text = "\n\n".join(f"Paragraph {i}: the shipment {i} left dock {i % 9} carrying "
                           f"{i * 13} crates of assorted parts for the northern warehouse."
                           for i in range(PARAGRAPHS)).encode()
        service = DocumentService(db, IngestSettings())
        checked = service.check_files([IncomingFile("big.txt", text)], None)
        doc_id = (await service.upload(tenant.id, kb.id, checked))[0].document.id

        first = start_worker(env, log)
        # killed once two batches are embedded and written: mid-ingest by construction
        await wait_for(db, tenant.id, doc_id, lambda d: d.chunks_embedded >= 64, 120, log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # The sweeper (every 1 s, "stuck" after 2 s) left it alone while the worker lived.
        assert (await status_of(db, tenant.id, doc_id)).status == "processing"
        partial = await count_points(folder, tenant.id, doc_id)
        assert partial >= 64, "points reported written are missing after the crash"

        second = start_worker(env, log)
        try:
            doc = await wait_for(db, tenant.id, doc_id,
                                 lambda d: d.status in ("ready", "failed"), 180, log)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)
        assert doc.status == "ready", doc.error
        assert doc.attempts == 2 and doc.live_version == 1
        assert doc.chunk_count is not None and doc.chunk_count > 20
        assert partial < doc.chunk_count, "the worker finished before it was killed"
        assert await count_points(folder, tenant.id, doc_id) == doc.chunk_count
    finally:
        await db.close()
        shutil.rmtree(folder, ignore_errors=True)


async def test_lease_key_is_the_same_in_python_and_postgres(crash_db: str) -> None:
    db = Database(make_engine(DatabaseSettings(url=crash_db).application_url(),
                              DatabaseSettings(url=crash_db)))
    ids = [uuid.uuid4() for _ in range(50)] + [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]
    sql = text("SELECT " + LEASE_KEY_SQL.format(column="CAST(:id AS uuid)"))
    try:
        async with db.unscoped() as s:
            conn = await s.connection()
            for doc_id in ids:
                assert (await conn.execute(sql, {"id": str(doc_id)})).scalar_one() == lease_key(
                    doc_id)
    finally:
        await db.close()
