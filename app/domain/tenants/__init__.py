"""Tenants: the platform operator creates, updates and suspends them."""

from app.domain.tenants.controllers import TenantAdminController
from app.domain.tenants.deps import DEPENDENCIES

ROUTES = [TenantAdminController]
__all__ = ["DEPENDENCIES", "ROUTES"]
