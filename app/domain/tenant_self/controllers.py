"""``/v1/tenant`` (who am I), ``/v1/models`` (models this tenant may use) and the
tenant's system prompt (``/v1/tenant/system-prompt``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from litestar import Request, get, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from pydantic import BaseModel, ConfigDict

from app.auth.keys import Scope
from app.auth.principal import TenantPrincipal
from app.db.models import SystemMessagePolicy, SystemPromptVersion, Tenant, Tier
from app.domain.tenants.prompts import PromptService
from app.domain.tenants.schemas import SystemPrompt
from app.domain.tenants.service import TenantService, allowed_models
from app.http.guards import (
    actor_of,
    chat_or_embed,
    chat_tenant_of,
    requires_scope,
    tenant_of,
    tenant_row,
)
from app.http.paging import Offset
from app.inference.dispatcher import Dispatcher
from app.settings import Settings

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
     guards=[chat_or_embed])
async def list_models(request: AnyRequest, tenants: NamedDependency[TenantService],
                      state: State) -> ModelList:
    """The tenant's allowed models (its own list, else every model the platform's
    pools serve, else ``LLM_MODELS``), as OpenAI clients expect them."""
    tenant = tenant_row(request) or await tenants.get_own(chat_tenant_of(request))
    dispatcher: Dispatcher | None = state.dispatcher
    settings: Settings = state.settings
    served = dispatcher.models if dispatcher is not None else list(settings.llm.models)
    return ModelList(data=[ModelCard(id=m) for m in allowed_models(tenant, served)])


class SystemPromptOut(BaseModel):
    """The tenant's current system prompt, who set it and when, and the policy for
    callers' own system messages."""

    text: str
    version: int | None
    updated_by: str | None
    updated_at: datetime | None
    system_message_policy: SystemMessagePolicy


class SystemPromptUpdate(BaseModel):
    """A new prompt (kept as a new version) and/or a new policy."""

    model_config = ConfigDict(extra="forbid")

    text: SystemPrompt | None = None
    system_message_policy: SystemMessagePolicy | None = None


class SystemPromptVersionOut(BaseModel):
    """One version of the prompt."""

    model_config = ConfigDict(from_attributes=True)

    version: int
    text: str
    created_by: str
    created_at: datetime


class SystemPromptVersionPage(BaseModel):
    """Versions, newest first."""

    data: list[SystemPromptVersionOut]
    total: int
    limit: int
    offset: int


ADMIN = requires_scope(Scope.admin)


def _prompt_out(tenant: Tenant, newest: SystemPromptVersion | None) -> SystemPromptOut:
    return SystemPromptOut(
        text=tenant.system_prompt, version=newest.version if newest else None,
        updated_by=newest.created_by if newest else None,
        updated_at=newest.created_at if newest else None,
        system_message_policy=SystemMessagePolicy(tenant.system_message_policy))


@get("/v1/tenant/system-prompt", summary="The tenant's system prompt", tags=["tenant"],
     guards=[ADMIN])
async def get_system_prompt(request: AnyRequest,
                            prompts: NamedDependency[PromptService]) -> SystemPromptOut:
    """The current prompt and policy."""
    return _prompt_out(*await prompts.current(tenant_of(request)))


@put("/v1/tenant/system-prompt", summary="Change the system prompt or policy",
     tags=["tenant"], guards=[ADMIN])
async def put_system_prompt(request: AnyRequest, data: JSONBody[SystemPromptUpdate],
                            prompts: NamedDependency[PromptService]) -> SystemPromptOut:
    """A changed text becomes a new version, recorded with the key that set it."""
    tenant, newest = await prompts.update(tenant_of(request), actor_of(request), data.text,
                                          data.system_message_policy)
    return _prompt_out(tenant, newest)


@get("/v1/tenant/system-prompt/versions", summary="Every version of the system prompt",
     tags=["tenant"], guards=[ADMIN])
async def list_system_prompt_versions(
    request: AnyRequest, prompts: NamedDependency[PromptService],
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    offset: Offset = 0,
) -> SystemPromptVersionPage:
    """Newest first, with who set each and when."""
    rows, total = await prompts.versions(tenant_of(request), limit, offset)
    return SystemPromptVersionPage(data=[SystemPromptVersionOut.model_validate(v) for v in rows],
                                   total=total, limit=limit, offset=offset)
