"""Embed tokens for browser chat UIs, and the tenant's allowed CORS origins."""
