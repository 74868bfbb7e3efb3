"""The transactional outbox: messages written in the same transaction as the change
that needs them, so a commit and its enqueue can never diverge. A relay in workers/
sends them to the broker. The request path never imports workers; actors are named here.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.models import OutboxMessage

INGEST_DOCUMENT = "ingest_document"
DELETE_DOCUMENT_POINTS = "delete_document_points"
DELETE_KB_POINTS = "delete_kb_points"
DELETE_STALE_VERSIONS = "delete_stale_versions"


def enqueue(session: AsyncSession, tenant_id: uuid.UUID, actor: str, **args: Any) -> None:
    """Add a message to the outbox inside the caller's transaction."""
    session.add(OutboxMessage(tenant_id=tenant_id, actor=actor, args=args))
