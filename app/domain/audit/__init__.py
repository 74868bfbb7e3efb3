"""The audit log: admin actions and key operations, recorded with the change itself."""

from app.domain.audit.controllers import admin_audit, tenant_audit
from app.domain.audit.deps import DEPENDENCIES

ROUTES = [tenant_audit, admin_audit]
__all__ = ["DEPENDENCIES", "ROUTES"]
