"""Audit log responses and the query a reader pages through."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class AuditQuery:
    """Which events to read: newest first, ``limit`` of them, older than ``before``
    (an event id) if given, within ``[start, end)``, of one action or family
    (``key.*``)."""

    limit: int = 100
    before: int | None = None
    start: datetime | None = None
    end: datetime | None = None
    action: str | None = None


class AuditEventOut(BaseModel):
    """One recorded action."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    tenant_id: uuid.UUID | None
    actor: str
    action: str
    target_type: str
    target_id: str | None
    details: dict[str, Any]
    request_id: str | None


class AuditPage(BaseModel):
    """Events, newest first; ``next_before`` fetches the next (older) page, null at the end."""

    data: list[AuditEventOut]
    next_before: int | None
