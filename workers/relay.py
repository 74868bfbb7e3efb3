"""Sends outbox rows to Dramatiq, then deletes them; at-least-once, in id order.

Several relays may run at once (one per worker process): ``SKIP LOCKED`` hands each row
to exactly one of them. If the send succeeds but the commit fails, the row is sent again
later; every actor is idempotent, so that is harmless.

Ingestion is shared fairly: a tenant has at most ``tenant_inflight`` documents *in
flight* (``queued`` or ``processing`` with no outbox row left, i.e. sent to the broker
and not yet ready or failed). Its other ingest messages stay in the outbox, their
documents ``queued``, and are released as its earlier ones finish: first each tenant's
oldest, then each tenant's next (round-robin), so a tenant with a long queue never
delays another's upload by more than the documents already in flight. One relay at a
time releases ingest messages (a transaction-scoped advisory lock), so two relays cannot
both fill the same free slot. Held messages are never "stuck" for the sweeper: it only
re-sends documents that have no outbox row (see app/domain/knowledge/sweeper.py).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import dramatiq
from sqlalchemy import text
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import OutboxMessage
from app.outbox import INGEST_DOCUMENT

log = logging.getLogger(__name__)
RELEASE_LOCK_KEY = 0x7E1A_1A5E  # pg advisory lock: one ingest release at a time

# Runs in the platform scope: fairness is across every tenant.
_RELEASABLE = text(f"""
WITH in_flight AS (
    SELECT d.tenant_id, count(*) AS n FROM documents d
    WHERE d.status IN ('queued', 'processing')
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.actor = '{INGEST_DOCUMENT}'
                      AND o.args ->> 'document_id' = d.id::text)
    GROUP BY d.tenant_id
), waiting AS (
    SELECT o.id, o.tenant_id,
           row_number() OVER (PARTITION BY o.tenant_id ORDER BY o.id) AS turn
    FROM outbox o WHERE o.actor = '{INGEST_DOCUMENT}'
)
SELECT w.id FROM waiting w LEFT JOIN in_flight f ON f.tenant_id = w.tenant_id
WHERE w.turn <= :cap - coalesce(f.n, 0)
ORDER BY w.turn, w.id
LIMIT :batch
""")
# The sweeper's clock for a released document starts when it is sent, not uploaded.
_MARK_SENT = text(
    "UPDATE documents SET queued_at = now() WHERE id = ANY(:ids) AND status = 'queued'")


class OutboxRelay:
    """Moves committed outbox messages onto the broker; ingest ones a fair share at a time."""

    def __init__(self, db: Database, broker: dramatiq.Broker,
                 message_options: dict[str, dict[str, Any]], batch: int = 100,
                 tenant_inflight: int = 16) -> None:
        self.db = db
        self.broker = broker
        self.message_options = message_options
        self.batch = batch
        self.tenant_inflight = tenant_inflight

    async def relay_once(self) -> int:
        """Send one batch of each kind, in one transaction; returns how many were sent."""
        async with self.db.platform() as session:
            return (await self._relay_maintenance(session)
                    + await self._release_ingest(session))

    async def _relay_maintenance(self, session: AsyncSession) -> int:
        """Every message but ingestion, in id order (deletes are cheap: never held)."""
        query = (select(OutboxMessage).where(col(OutboxMessage.actor) != INGEST_DOCUMENT)
                 .order_by(col(OutboxMessage.id))
                 .limit(self.batch).with_for_update(skip_locked=True))
        rows = (await session.exec(query)).all()
        await self._send_and_delete(session, rows)
        return len(rows)

    async def _release_ingest(self, session: AsyncSession) -> int:
        """Ingest messages of tenants under their in-flight cap, round-robin."""
        conn = await session.connection()
        if not await conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                 {"k": RELEASE_LOCK_KEY}):
            return 0  # another relay is releasing right now
        ids = (await conn.execute(_RELEASABLE, {"cap": self.tenant_inflight,
                                                "batch": self.batch})).scalars().all()
        if not ids:
            return 0
        found = (await session.exec(select(OutboxMessage)
                                    .where(col(OutboxMessage.id).in_(ids)))).all()
        turn = {message_id: i for i, message_id in enumerate(ids)}
        rows = sorted(found, key=lambda r: turn[r.id])  # round-robin order to the broker
        await conn.execute(_MARK_SENT, {
            "ids": [uuid.UUID(r.args["document_id"]) for r in rows]})
        await self._send_and_delete(session, rows)
        return len(rows)

    async def _send_and_delete(self, session: AsyncSession,
                               rows: Sequence[OutboxMessage]) -> None:
        for row in rows:
            self._send(row)
        if rows:
            ids = [r.id for r in rows]
            await (await session.connection()).execute(
                delete(OutboxMessage).where(col(OutboxMessage.id).in_(ids)))

    def _send(self, row: OutboxMessage) -> None:
        actor = self.broker.get_actor(row.actor)
        kwargs = {"tenant_id": str(row.tenant_id), **row.args}
        options = dict(self.message_options.get(row.actor, {}))
        delay = options.pop("delay", None)
        self.broker.enqueue(actor.message_with_options(kwargs=kwargs, **options), delay=delay)
