"""Writing the audit log: one row per change, added to the session of the change itself,
so a change never commits without its record and a failed change leaves none."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic_core import to_jsonable_python
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.models import AuditEvent
from app.logs import request_id_var

# Never a detail's name: an audit row must not carry key material or its hash.
_SECRET_NAMES = frozenset({"key", "plaintext", "secret", "secret_hash", "password"})


class AuditAction(enum.StrEnum):
    """The stable names of audited actions (clients filter on them)."""

    tenant_created = "tenant.created"
    tenant_updated = "tenant.updated"
    tenant_suspended = "tenant.suspended"
    tenant_activated = "tenant.activated"
    system_prompt_changed = "system_prompt.changed"
    key_created = "key.created"
    key_revoked = "key.revoked"
    key_rotated = "key.rotated"
    knowledge_base_created = "knowledge_base.created"
    knowledge_base_renamed = "knowledge_base.renamed"
    knowledge_base_updated = "knowledge_base.updated"
    knowledge_base_deleted = "knowledge_base.deleted"
    document_deleted = "document.deleted"
    embed_origins_changed = "embed_origins.changed"
    content_rules_changed = "content_rules.changed"


def record_audit(
    session: AsyncSession, tenant_id: uuid.UUID | None, actor: str, action: AuditAction,
    target: tuple[str, object], details: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Add the audit row of a change to the change's own transaction. ``target`` is
    (type, id); ``details`` says what changed, never a secret; ``tenant_id`` None is a
    platform-wide action."""
    found = _SECRET_NAMES.intersection(_names(details or {}))
    if found:
        raise ValueError(f"audit details must not carry secrets: {sorted(found)}")
    target_type, target_id = target
    event = AuditEvent(
        tenant_id=tenant_id, actor=actor, action=action.value, target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        details=to_jsonable_python(dict(details or {})), request_id=request_id_var.get(),
    )
    session.add(event)
    return event


def changed_fields(row: object, values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{field: {"from": old, "to": new}}`` for each of ``values`` that differs from
    ``row`` (fields set to what they already were are left out)."""
    return {name: {"from": getattr(row, name), "to": value}
            for name, value in values.items() if getattr(row, name) != value}


def _names(details: Mapping[str, Any]) -> set[str]:
    names = set(details)
    for value in details.values():
        if isinstance(value, Mapping):
            names |= _names(value)
    return names
