"""Tenant API keys: mint (shown once), list, revoke."""
