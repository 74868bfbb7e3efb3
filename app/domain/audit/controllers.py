"""``GET /v1/audit`` (a tenant's admins: their own tenant's events) and ``GET
/admin/audit`` (the operator: every tenant's), newest first, as JSON or CSV."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromQuery, QueryParameter

from app.auth.keys import Scope
from app.domain.audit.schemas import AuditPage, AuditQuery
from app.domain.audit.service import AuditService
from app.domain.usage.controllers import Format, From, To
from app.errors import BadRequestError
from app.http.csv_export import csv_response
from app.http.guards import platform_only, requires_scope, tenant_of
from app.http.openapi import also_answering

AnyRequest = Request[Any, Any, Any]
Limit = FromQuery[Annotated[int, QueryParameter(ge=1, le=500)]]
Before = FromQuery[Annotated[int | None, QueryParameter(
    ge=1, le=2**63 - 1, description="only events older than this event id (the previous page's "
    "next_before)")]]
Action = FromQuery[Annotated[str | None, QueryParameter(
    pattern=r"^[a-z_]{1,30}(\.[a-z_]{1,30})?$|^[a-z_]{1,30}\.\*$",
    description="one action (key.revoked) or a family (key.*)")]]
CSV_COLUMNS = ("id", "created_at", "tenant_id", "actor", "action", "target_type",
               "target_id", "request_id", "details")


def _query(limit: int, before: int | None, start: datetime | None, end: datetime | None,
           action: str | None) -> AuditQuery:
    if any(t is not None and t.tzinfo is None for t in (start, end)):
        raise BadRequestError("from and to need a time zone (e.g. 2026-11-01T00:00:00Z)")
    try:  # PostgreSQL compares in UTC: a time near datetime's limits may not have one
        start, end = (None if t is None else t.astimezone(UTC) for t in (start, end))
    except OverflowError as exc:
        raise BadRequestError("from or to is out of range") from exc
    if start is not None and end is not None and start >= end:
        raise BadRequestError("from must be before to")
    return AuditQuery(limit=limit, before=before, start=start, end=end, action=action)


def _respond(page: AuditPage, fmt: str) -> Response[Any]:
    if fmt == "json":
        return Response(page)
    rows = []
    for event in page.data:
        row = event.model_dump(mode="json")
        row["details"] = json.dumps(row["details"], sort_keys=True)
        rows.append(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    return csv_response(CSV_COLUMNS, rows, "audit.csv")


@get("/v1/audit", guards=[requires_scope(Scope.admin)], tags=["tenant admin"],
     operation_class=also_answering("text/csv"),
     summary="The tenant's audit log: admin actions and key operations (JSON or CSV)")
async def tenant_audit(request: AnyRequest, audit: NamedDependency[AuditService],
                       limit: Limit = 100, before: Before = None, start: From = None,
                       end: To = None, action: Action = None,
                       format: Format = "json") -> Response[Any]:
    """This tenant's events, newest first, the operator's actions on it included."""
    query = _query(limit, before, start, end, action)
    return _respond(await audit.tenant_page(tenant_of(request), query), format)


@get("/admin/audit", guards=[platform_only], tags=["platform admin"],
     operation_class=also_answering("text/csv"),
     summary="Every tenant's audit log, or one tenant's (JSON or CSV)")
async def admin_audit(audit: NamedDependency[AuditService], limit: Limit = 100,
                      before: Before = None, start: From = None, end: To = None,
                      action: Action = None, tenant_id: FromQuery[uuid.UUID | None] = None,
                      format: Format = "json") -> Response[Any]:
    """All events (platform-wide ones too), newest first; ``tenant_id`` picks one tenant."""
    query = _query(limit, before, start, end, action)
    return _respond(await audit.platform_page(query, tenant_id), format)
