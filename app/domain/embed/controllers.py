"""``POST /v1/embed-tokens`` (a tenant's backend mints a token for its end user's
browser) and ``/v1/tenant/embed`` (the origins allowed to use them)."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, post, put
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.auth.keys import Scope
from app.auth.principal import TenantPrincipal
from app.domain.embed.schemas import EmbedSettings, EmbedToken, EmbedTokenRequest
from app.domain.embed.service import EmbedService
from app.http.guards import actor_of, requires_scope, tenant_of
from app.http.openapi import problems

AnyRequest = Request[Any, Any, Any]
ADMIN = requires_scope(Scope.admin)


@post("/v1/embed-tokens", status_code=201, tags=["chat"], guards=[requires_scope(Scope.chat)],
      responses=problems(404),
      summary="Mint a short-lived token a browser chat UI uses for one end user")
async def mint_embed_token(request: AnyRequest, data: JSONBody[EmbedTokenRequest],
                           embed: NamedDependency[EmbedService]) -> EmbedToken:
    """Called by the tenant's backend with a ``chat`` key; the token chats as ``user``
    on the given knowledge bases only, from the tenant's allowed origins."""
    p: TenantPrincipal = request.user
    return await embed.mint(tenant_of(request), p.key_id, data)


@get("/v1/tenant/embed", tags=["tenant"], guards=[ADMIN],
     summary="Origins whose pages may use the tenant's embed tokens")
async def get_embed_settings(request: AnyRequest,
                             embed: NamedDependency[EmbedService]) -> EmbedSettings:
    """The allowed CORS origins."""
    return EmbedSettings(cors_origins=await embed.origins(tenant_of(request)))


@put("/v1/tenant/embed", tags=["tenant"], guards=[ADMIN],
     summary="Set the origins whose pages may use the tenant's embed tokens")
async def put_embed_settings(request: AnyRequest, data: JSONBody[EmbedSettings],
                             embed: NamedDependency[EmbedService]) -> EmbedSettings:
    """Replace the allowed CORS origins (``https://app.example.com``, no path)."""
    return EmbedSettings(cors_origins=await embed.set_origins(
        tenant_of(request), data.cors_origins, actor_of(request)))
