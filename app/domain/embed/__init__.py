"""Embed tokens for browser chat UIs, and the tenant's allowed CORS origins."""

from app.domain.embed.controllers import get_embed_settings, mint_embed_token, put_embed_settings
from app.domain.embed.deps import DEPENDENCIES

ROUTES = [mint_embed_token, get_embed_settings, put_embed_settings]
__all__ = ["DEPENDENCIES", "ROUTES"]
