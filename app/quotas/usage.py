"""Usage events in PostgreSQL: one row per request, idempotent on (tenant, request id)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import UsageEvent

CHAT = "chat"
EMBEDDING = "embedding"


class UsageService:
    """Writes and sums usage events, always inside the tenant's own scope (RLS)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, event: UsageEvent) -> bool:
        """Insert the event; False if one with its request id exists (a replay)."""
        async with self.db.tenant(event.tenant_id) as session:
            return await add_event(session, event)

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
    stmt = (insert(UsageEvent).values(**event.model_dump(exclude={"id"}))
            .on_conflict_do_nothing(constraint="usage_events_request_unique")
            .returning(UsageEvent.__table__.c.id))  # type: ignore[attr-defined]
    return (await session.execute(stmt)).first() is not None
