"""Usage reports: a tenant's own and the operator's, as JSON or CSV, and the quarantine."""

from app.domain.usage.controllers import admin_usage, tenant_usage
from app.domain.usage.quarantine import admin_usage_quarantine

ROUTES = [tenant_usage, admin_usage, admin_usage_quarantine]
__all__ = ["ROUTES"]
