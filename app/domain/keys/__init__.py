"""Tenant API keys: mint (shown once), list, revoke."""

from app.domain.keys.controllers import PlatformKeysController, TenantKeysController
from app.domain.keys.deps import DEPENDENCIES

ROUTES = [PlatformKeysController, TenantKeysController]
__all__ = ["DEPENDENCIES", "ROUTES"]
