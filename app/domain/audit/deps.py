"""The audit area's provider: the audit log reader, built per request."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.audit.service import AuditService


def provide_audit(state: State) -> AuditService:
    """The audit log reader."""
    return AuditService(state.db)


DEPENDENCIES = {"audit": Provide(provide_audit, sync_to_thread=False)}
