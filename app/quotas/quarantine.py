"""The usage quarantine: usage events the batch writer could not store, kept with the
reason so that one bad event costs only itself, never the other events of its batch.

The writer sets an event aside here when PostgreSQL refuses that event alone (a value
it cannot hold, a tenant that is gone). Each row keeps the event's columns as JSON,
its text escaped (``\\u0000``) so the row itself is storable, and the driver's error.
Only the platform scope reads or writes the table; the operator pages through it at
``GET /admin/usage/quarantine`` (app/domain/usage/quarantine.py; docs/operations.md says
how to replay a row).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import exc as sa_exc

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
