"""``/v1/tenant`` (who am I) and ``/v1/models`` (models this tenant may use)."""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from pydantic import BaseModel

from app.api.guards import requires_scope, tenant_of
from app.auth.keys import Scope
from app.auth.principal import TenantPrincipal
from app.db.models import Tier
from app.domain.tenants.service import TenantService

AnyRequest = Request[Any, Any, Any]


class WhoAmI(BaseModel):
    """The calling key and its tenant."""

    tenant_id: FromPath[uuid.UUID]
    tenant_slug: str
    tier: Tier
    key_id: FromPath[uuid.UUID]
    scopes: list[Scope]


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models`` (OpenAI wire format)."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "tenantrag"


class ModelList(BaseModel):
    """OpenAI's list envelope."""

    object: str = "list"
    data: list[ModelCard]


@get("/v1/tenant", summary="The calling key and its tenant", tags=["tenant"])
async def whoami(request: AnyRequest) -> WhoAmI:
    """Any valid tenant key may ask who it is."""
    tenant_of(request)
    p: TenantPrincipal = request.user
    return WhoAmI(tenant_id=p.tenant_id, tenant_slug=p.tenant_slug, tier=p.tier,
                  key_id=p.key_id, scopes=sorted(p.scopes))


@get("/v1/models", summary="Models this tenant may use", tags=["chat"],
     guards=[requires_scope(Scope.chat)])
async def list_models(request: AnyRequest, tenants: NamedDependency[TenantService]) -> ModelList:
    """The tenant's allowed models, as OpenAI clients expect them."""
    tenant = await tenants.get_own(tenant_of(request))
    return ModelList(data=[ModelCard(id=m) for m in tenant.allowed_models])
