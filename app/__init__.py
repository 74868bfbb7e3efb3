"""Tenant-isolated RAG assistant backend: API, service core and CLI."""
