"""Credentials: API key format, hashing and the authenticated principal."""
