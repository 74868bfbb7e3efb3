"""The operator's page through the usage quarantine (``GET /admin/usage/quarantine``): the
events the batch writer set aside (app/quotas/quarantine.py), newest first, with why."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from litestar import get
from litestar.datastructures import State
from litestar.params import FromQuery, QueryParameter
from pydantic import BaseModel, ConfigDict
from sqlmodel import col, select

from app.db.engine import Database
from app.db.models import UsageQuarantine
from app.http.guards import platform_only


class QuarantinedEventOut(BaseModel):
    """One event set aside: whose, why, and its columns (text escaped)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    tenant_id: uuid.UUID
    request_id: str
    kind: str
    error: str
    reason: str
    event: dict[str, Any]


class QuarantinePage(BaseModel):
    """Newest first; ``next_before`` fetches the next (older) page, null at the end."""

    data: list[QuarantinedEventOut]
    next_before: int | None


async def quarantine_page(db: Database, limit: int, before: int | None,
                          tenant_id: uuid.UUID | None) -> QuarantinePage:
    """A page of quarantined events, newest first, of one tenant or all."""
    # One row more than asked for says whether there is a next page.
    stmt = select(UsageQuarantine).order_by(col(UsageQuarantine.id).desc()).limit(limit + 1)
    if before is not None:
        stmt = stmt.where(col(UsageQuarantine.id) < before)
    if tenant_id is not None:
        stmt = stmt.where(col(UsageQuarantine.tenant_id) == tenant_id)
    async with db.platform() as session:
        rows = list((await session.exec(stmt)).all())
    data = [QuarantinedEventOut.model_validate(r) for r in rows[:limit]]
    return QuarantinePage(data=data, next_before=data[-1].id if len(rows) > limit else None)


Limit = FromQuery[Annotated[int, QueryParameter(ge=1, le=500)]]
Before = FromQuery[Annotated[int | None, QueryParameter(
    ge=1, le=2**63 - 1, description="only events older than this one (the previous page's "
    "next_before)")]]


@get("/admin/usage/quarantine", guards=[platform_only], tags=["platform admin"],
     summary="Usage events the writer could not store, with the reason (newest first)")
async def admin_usage_quarantine(state: State, limit: Limit = 100, before: Before = None,
                                 tenant_id: FromQuery[uuid.UUID | None] = None,
                                 ) -> QuarantinePage:
    """Events set aside instead of failing their batch; ``tenant_id`` picks one tenant."""
    return await quarantine_page(state.db, limit, before, tenant_id)
