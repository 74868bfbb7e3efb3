"""Usage reports: ``GET /v1/usage`` (a tenant's own, ``admin`` scope) and
``GET /admin/usage`` (the operator, across tenants), as JSON or CSV (text cells a
spreadsheet would run as formulas are quoted: app/http/csv_export.py)."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.params import FromQuery, QueryParameter
from pydantic import BaseModel
from sqlalchemy import func, select

from app.auth.keys import Scope
from app.db.engine import Database
from app.db.models import Tenant, UsageEvent
from app.errors import BadRequestError
from app.http.csv_export import csv_response
from app.http.guards import platform_only, requires_scope, tenant_of
from app.http.openapi import also_answering
from app.http.timestamps import UtcDateTime

AnyRequest = Request[Any, Any, Any]
MAX_SPAN = timedelta(days=366)
DEFAULT_SPAN = timedelta(days=30)
EARLIEST = datetime.min.replace(tzinfo=UTC)


class GroupBy(enum.StrEnum):
    """How rows are grouped."""

    day = "day"
    model = "model"
    user = "user"
    tenant = "tenant"  # operator only


class Kind(enum.StrEnum):
    """Which events a report counts."""

    all = "all"
    chat = "chat"
    embedding = "embedding"  # ingestion: one event per document version embedded


class UsageRow(BaseModel):
    """Totals of one group."""

    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    errors: int
    cost_usd: Decimal
    gpu_seconds: float


class UsageReport(BaseModel):
    """Totals per group over ``[from, to)``."""

    start: datetime
    end: datetime
    group_by: GroupBy
    kind: Kind
    data: list[UsageRow]


def _window(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    end = end or datetime.now(UTC)
    # (from the earliest time there is when ``to`` is within 30 days of it)
    start = start or max(end, EARLIEST + DEFAULT_SPAN) - DEFAULT_SPAN
    if start.tzinfo is None or end.tzinfo is None:
        raise BadRequestError("from and to need a time zone (e.g. 2026-11-01T00:00:00Z)")
    if start >= end:
        raise BadRequestError("from must be before to")
    if end - start > MAX_SPAN:
        raise BadRequestError("a report spans at most 366 days")
    return start, end


async def usage_report(db: Database, tenant_id: uuid.UUID | None, start: datetime,
                       end: datetime, group_by: GroupBy, kind: Kind = Kind.all) -> UsageReport:
    """Totals per group; ``tenant_id`` None = every tenant (operator scope)."""
    t = UsageEvent.__table__.c  # type: ignore[attr-defined]
    if group_by is GroupBy.day:
        key: Any = func.to_char(func.date_trunc("day", func.timezone("UTC", t.created_at)),
                                "YYYY-MM-DD")
    elif group_by is GroupBy.model:
        key = t.model
    elif group_by is GroupBy.user:
        key = t.end_user
    else:
        key = Tenant.__table__.c.slug  # type: ignore[attr-defined]
    stmt = select(
        key.label("key"), func.count().label("requests"),
        func.coalesce(func.sum(t.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(t.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(t.cached_tokens), 0).label("cached_tokens"),
        func.count().filter(t.status != "ok").label("errors"),
        func.coalesce(func.sum(t.cost_usd), 0).label("cost_usd"),
        func.coalesce(func.sum(t.gpu_seconds), 0.0).label("gpu_seconds"),
    ).where(t.created_at >= start, t.created_at < end).group_by(key).order_by(key)
    if kind is not Kind.all:
        stmt = stmt.where(t.kind == kind.value)
    if group_by is GroupBy.tenant:
        stmt = stmt.join(Tenant.__table__, Tenant.__table__.c.id == t.tenant_id)  # type: ignore[attr-defined]
    if tenant_id is not None:
        stmt = stmt.where(t.tenant_id == tenant_id)
        scope = db.tenant(tenant_id)
    else:
        scope = db.platform()
    async with scope as session:
        rows = (await session.execute(stmt)).all()
    return UsageReport(start=start, end=end, group_by=group_by, kind=kind, data=[
        UsageRow(key=str(r.key), requests=r.requests, prompt_tokens=r.prompt_tokens,
                 completion_tokens=r.completion_tokens,
                 total_tokens=r.prompt_tokens + r.completion_tokens,
                 cached_tokens=r.cached_tokens, errors=r.errors, cost_usd=r.cost_usd,
                 gpu_seconds=float(r.gpu_seconds))
        for r in rows])


def _respond(report: UsageReport, fmt: str) -> Response[Any]:
    if fmt == "json":
        return Response(report)
    columns = ["requests", "prompt_tokens", "completion_tokens", "total_tokens",
               "cached_tokens", "errors", "cost_usd", "gpu_seconds"]
    return csv_response([report.group_by.value, *columns],
                        ([r.key, *(getattr(r, c) for c in columns)] for r in report.data),
                        f"usage-{report.group_by.value}.csv")


# Parsed, checked and held in UTC before a route runs (out of range: a 400 naming it).
From = FromQuery[Annotated[UtcDateTime | None,
                           QueryParameter(name="from", description="inclusive, ISO 8601")]]
To = FromQuery[Annotated[UtcDateTime | None,
                         QueryParameter(name="to", description="exclusive, ISO 8601")]]
Format = FromQuery[Annotated[str, QueryParameter(pattern="^(json|csv)$")]]


@get("/v1/usage", guards=[requires_scope(Scope.admin)], tags=["usage"],
     operation_class=also_answering("text/csv"),
     summary="The tenant's usage per day, model or end user (JSON or CSV)")
async def tenant_usage(request: AnyRequest, state: State, start: From = None, end: To = None,
                       group_by: FromQuery[GroupBy] = GroupBy.day,
                       kind: FromQuery[Kind] = Kind.all, format: Format = "json",
                       ) -> Response[Any]:
    """Requests, tokens, cost and GPU time over ``[from, to)`` (default: the last 30
    days); ``kind`` picks chat or embedding (ingestion) events."""
    if group_by is GroupBy.tenant:
        raise BadRequestError("group_by=tenant is for the operator's /admin/usage")
    s, e = _window(start, end)
    return _respond(await usage_report(state.db, tenant_of(request), s, e, group_by, kind),
                    format)


@get("/admin/usage", guards=[platform_only], tags=["platform admin"],
     operation_class=also_answering("text/csv"),
     summary="Usage across tenants per tenant, day, model or end user (JSON or CSV)")
async def admin_usage(state: State, start: From = None, end: To = None,
                      group_by: FromQuery[GroupBy] = GroupBy.tenant,
                      kind: FromQuery[Kind] = Kind.all, format: Format = "json",
                      ) -> Response[Any]:
    """Every tenant's requests, tokens, cost and GPU time over ``[from, to)``."""
    s, e = _window(start, end)
    return _respond(await usage_report(state.db, None, s, e, group_by, kind), format)
