"""Sends outbox rows to Dramatiq, then deletes them; at-least-once, in id order.

Several relays may run at once (one per worker process): ``SKIP LOCKED`` hands each row
to exactly one of them. If the send succeeds but the commit fails, the row is sent again
later; every actor is idempotent, so that is harmless.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from sqlmodel import col, delete, select

from app.db.engine import Database
from app.db.models import OutboxMessage

log = logging.getLogger(__name__)


class OutboxRelay:
    """Moves committed outbox messages onto the broker."""

    def __init__(self, db: Database, broker: dramatiq.Broker,
                 message_options: dict[str, dict[str, Any]], batch: int = 100) -> None:
        self.db = db
        self.broker = broker
        self.message_options = message_options
        self.batch = batch

    async def relay_once(self) -> int:
        """Send one batch; returns how many messages were sent."""
        query = (select(OutboxMessage).order_by(col(OutboxMessage.id))
                 .limit(self.batch).with_for_update(skip_locked=True))
        async with self.db.platform() as session:
            rows = (await session.exec(query)).all()
            for row in rows:
                self._send(row)
            if rows:
                ids = [r.id for r in rows]
                await (await session.connection()).execute(
                    delete(OutboxMessage).where(col(OutboxMessage.id).in_(ids)))
        return len(rows)

    def _send(self, row: OutboxMessage) -> None:
        actor = self.broker.get_actor(row.actor)
        kwargs = {"tenant_id": str(row.tenant_id), **row.args}
        options = dict(self.message_options.get(row.actor, {}))
        delay = options.pop("delay", None)
        self.broker.enqueue(actor.message_with_options(kwargs=kwargs, **options), delay=delay)
