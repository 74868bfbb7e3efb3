"""Retrieval: per-tenant vector storage and hybrid search."""
