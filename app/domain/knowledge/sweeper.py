"""Re-sends documents stuck in ``queued`` or ``processing``, so no upload silently sticks.

A document is stuck if it has waited longer than the configured time, no message is left
in the outbox for it, and no live worker holds its lease (the broker lost the message, or
the worker processing it died: its lease died with its database connection). Re-sending
is always safe: the pipeline's lease and version checks make a duplicate a no-op.
A document the relay holds back for its tenant's fair share still has its outbox
message, so it is waiting, not stuck; the relay restarts ``queued_at`` when it sends it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import text

from app.db.engine import Database
from app.db.models import utcnow
from app.domain.knowledge.pipeline import LEASE_KEY_SQL
from app.outbox import INGEST_DOCUMENT
from app.settings import IngestSettings

log = logging.getLogger(__name__)

# Runs in the platform scope: the sweeper serves every tenant.
_RESEND = text(f"""
WITH stuck AS (
    SELECT d.id FROM documents d
    WHERE ((d.status = 'queued' AND d.queued_at < :queued_before)
        OR (d.status = 'processing' AND d.processing_started_at < :processing_before))
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.args ->> 'document_id' = d.id::text)
      -- a live worker holds the lease while it works: then it is not stuck, only slow
      AND pg_try_advisory_xact_lock({LEASE_KEY_SQL.format(column="d.id")})
    ORDER BY d.updated_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
), requeued AS (
    UPDATE documents d SET status = 'queued', queued_at = :now, updated_at = :now
    FROM stuck WHERE d.id = stuck.id
    RETURNING d.id, d.tenant_id, d.version
)
INSERT INTO outbox (tenant_id, actor, args, created_at)
SELECT tenant_id, '{INGEST_DOCUMENT}',
       jsonb_build_object('document_id', id::text, 'version', version), :now
FROM requeued
RETURNING args ->> 'document_id'
""")


class StuckDocumentSweeper:
    """Finds stranded documents across all tenants and queues them again."""

    def __init__(self, db: Database, settings: IngestSettings, batch: int = 500) -> None:
        self.db = db
        self.settings = settings
        self.batch = batch

    async def sweep(self) -> int:
        """One pass; returns how many documents were re-sent."""
        now = utcnow()
        params = {
            "now": now,
            "queued_before": now - timedelta(seconds=self.settings.resend_queued_after_s),
            "processing_before": now - timedelta(
                seconds=self.settings.resend_processing_after_s),
            "batch": self.batch,
        }
        async with self.db.platform() as session:
            ids = (await (await session.connection()).execute(_RESEND, params)).scalars().all()
        if ids:
            log.warning("re-sent %d stuck document(s): %s", len(ids), ", ".join(ids[:20]))
        return len(ids)
