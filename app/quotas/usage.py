"""Usage events in PostgreSQL: one row per request, idempotent on (tenant, request id)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import UsageEvent
from app.quotas.usage_writer import Metered, UsageWriter, insert_events, write_events

CHAT = "chat"
EMBEDDING = "embedding"


class UsageService:
    """Writes and sums usage events, always inside the tenant's own scope (RLS)."""

    def __init__(self, db: Database, writer: UsageWriter | None = None) -> None:
        self.db = db
        self.writer = writer

    async def record(self, event: Metered) -> bool:
        """Store the event (batched by the process's writer, if it has one); False if
        one with its request id exists (a replay)."""
        if self.writer is not None:
            return await self.writer.record(event)
        return (await write_events(self.db, [event]))[0]

    async def tokens_in_period(self, tenant_id: uuid.UUID, period: str) -> int:
        """Generation tokens metered for the tenant in a budget period (``YYYY-MM``,
        UTC): what its token budget counts (embedding tokens are metered, not budgeted)."""
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
        end = (start.replace(year=start.year + 1, month=1) if start.month == 12
               else start.replace(month=start.month + 1))
        t = UsageEvent.__table__.c  # type: ignore[attr-defined]
        async with self.db.tenant(tenant_id) as session:
            total = await session.scalar(
                select(func.coalesce(func.sum(t.prompt_tokens + t.completion_tokens), 0))
                .where(t.tenant_id == tenant_id, t.kind == CHAT, t.created_at >= start,
                       t.created_at < end))
        return int(total or 0)



async def add_event(session: AsyncSession, event: UsageEvent) -> bool:
    """Insert the event in the session's transaction (its tenant's scope); False if one
    with its request id exists."""
    return bool(await insert_events(session, [event]))
