"""The usage quarantine: usage events the batch writer could not store, kept with the
reason so that one bad event costs only itself, never the other events of its batch.

The writer sets an event aside here when PostgreSQL refuses that event alone (a value
it cannot hold, a tenant that is gone). Each row keeps the event's columns as JSON,
its text escaped (``\\u0000``) so the row itself is storable, and the driver's error.
Only the platform scope reads or writes the table; the operator pages through it at
``GET /admin/usage/quarantine`` (docs/operations.md says how to replay a row).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from litestar import get
from litestar.datastructures import State
from litestar.params import FromQuery, QueryParameter
from pydantic import BaseModel, ConfigDict
from sqlalchemy import exc as sa_exc
from sqlmodel import col, select

from app.api.guards import platform_only
from app.db.engine import Database
from app.db.models import UsageQuarantine
from app.text_fields import escape_controls

MAX_REASON_CHARS = 2000


def error_of(exc: BaseException) -> tuple[str, str]:
    """The error's class (the driver's own, under SQLAlchemy's wrappers) and its message
    with its SQLSTATE, escaped and bounded: what the operator reads."""
    cause: BaseException = exc
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        cause = exc.orig
    while cause.__cause__ is not None:  # the asyncpg error under the DB-API adapter's
        cause = cause.__cause__
    text = str(cause).strip()
    message = text.splitlines()[0] if text else repr(cause)
    sqlstate = getattr(cause, "sqlstate", None)
    if sqlstate:
        message = f"[{sqlstate}] {message}"
    return type(cause).__name__[:100], escape_controls(message)[:MAX_REASON_CHARS]


def storable(values: dict[str, Any]) -> dict[str, Any]:
    """An event's column values as JSON PostgreSQL accepts: text escaped, numbers that
    JSON cannot hold (Decimal, NaN) and times as strings."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, str):
            value = escape_controls(value)
        elif isinstance(value, Decimal | datetime | uuid.UUID):
            value = str(value) if not isinstance(value, datetime) else value.isoformat()
        elif isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[name] = value
    return out


async def quarantine(db: Database, values: dict[str, Any],
                     exc: BaseException) -> tuple[str, str]:
    """Store one unstorable event (its column values) with the error that refused it;
    the error's class and message, as stored."""
    error, reason = error_of(exc)
    row = storable(values)
    async with db.platform() as session:
        session.add(UsageQuarantine(
            tenant_id=values["tenant_id"], request_id=str(row.get("request_id", "")),
            kind=str(row.get("kind", "")), error=error, reason=reason, event=row))
    return error, reason


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
