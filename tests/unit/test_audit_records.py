"""Audit records: what a change's row says, and that no secret can get into one."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from app.auth.principal import key_actor
from app.db.models import AuditEvent
from app.domain.audit.records import AuditAction, changed_fields, record_audit
from app.logs import request_id_var


class RecordingSession:
    """Stands in for the change's session: keeps what was added."""

    def __init__(self) -> None:
        self.added: list[Any] = []

    def add(self, row: Any) -> None:
        self.added.append(row)


def test_a_record_names_the_request_and_stores_plain_json() -> None:
    session, tenant, key = RecordingSession(), uuid.uuid4(), uuid.uuid4()
    token = request_id_var.set("req-42")
    try:
        event = record_audit(session, tenant, key_actor(key), AuditAction.key_created,  # type: ignore[arg-type]
                             ("api_key", key), {"replaced_by": key, "scopes": ["chat"]})
    finally:
        request_id_var.reset(token)
    assert session.added == [event] and isinstance(event, AuditEvent)
    assert (event.actor, event.action, event.target_id) == (f"key:{key}", "key.created",
                                                            str(key))
    assert event.details == {"replaced_by": str(key), "scopes": ["chat"]}
    assert event.request_id == "req-42"


@pytest.mark.parametrize("details", [{"key": "trk_x_y"}, {"secret_hash": "ab"},
                                     {"changes": {"secret": {"from": "a", "to": "b"}}}])
def test_a_secret_never_becomes_a_record(details: dict[str, Any]) -> None:
    session = RecordingSession()
    with pytest.raises(ValueError, match="secrets"):
        record_audit(session, None, "operator", AuditAction.key_rotated,  # type: ignore[arg-type]
                     ("api_key", None), details)
    assert session.added == []


def test_changed_fields_leaves_out_what_stays_the_same() -> None:
    row = SimpleNamespace(name="kb", description="", tier="pro")
    assert changed_fields(row, {"name": "kb", "description": "HR", "tier": "pro"}) == {
        "description": {"from": "", "to": "HR"}}
