"""Reading the audit log: a tenant's own events (its row-level-security scope) or, for
the operator, every tenant's."""

from __future__ import annotations

import uuid

from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from app.db.engine import Database
from app.db.models import AuditEvent
from app.domain.audit.schemas import AuditEventOut, AuditPage, AuditQuery


class AuditService:
    """Pages of audit events, newest first."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def tenant_page(self, tenant_id: uuid.UUID, query: AuditQuery) -> AuditPage:
        """The tenant's own events (operator actions on it included)."""
        stmt = _filtered(query).where(col(AuditEvent.tenant_id) == tenant_id)
        async with self.db.tenant(tenant_id) as session:
            rows = list((await session.exec(stmt)).all())
        return _page(rows, query.limit)

    async def platform_page(self, query: AuditQuery,
                            tenant_id: uuid.UUID | None = None) -> AuditPage:
        """Every tenant's events and the platform-wide ones, or one tenant's."""
        stmt = _filtered(query)
        if tenant_id is not None:
            stmt = stmt.where(col(AuditEvent.tenant_id) == tenant_id)
        async with self.db.platform() as session:
            rows = list((await session.exec(stmt)).all())
        return _page(rows, query.limit)


def _filtered(query: AuditQuery) -> SelectOfScalar[AuditEvent]:
    # One row more than asked for says whether there is a next page.
    stmt = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(query.limit + 1)
    if query.before is not None:
        stmt = stmt.where(col(AuditEvent.id) < query.before)
    if query.start is not None:
        stmt = stmt.where(col(AuditEvent.created_at) >= query.start)
    if query.end is not None:
        stmt = stmt.where(col(AuditEvent.created_at) < query.end)
    if query.action is not None and query.action.endswith(".*"):
        stmt = stmt.where(col(AuditEvent.action).startswith(query.action[:-1],
                                                            autoescape=True))
    elif query.action is not None:
        stmt = stmt.where(col(AuditEvent.action) == query.action)
    return stmt


def _page(rows: list[AuditEvent], limit: int) -> AuditPage:
    more = len(rows) > limit
    data = [AuditEventOut.model_validate(r) for r in rows[:limit]]
    return AuditPage(data=data, next_before=data[-1].id if more else None)
