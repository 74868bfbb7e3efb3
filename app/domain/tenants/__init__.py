"""Tenants: the platform operator creates, updates and suspends them."""
