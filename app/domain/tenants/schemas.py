"""Request and response bodies for tenants (kept apart from the table model)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.db.models import SystemMessagePolicy, TenantStatus, Tier
from app.text_fields import FREE_TEXT, SINGLE_LINE

Slug = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"),
    Field(description="Lowercase letters, digits and hyphens; 1-63 characters; unique."),
]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                 SINGLE_LINE]
ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                      SINGLE_LINE]
SystemPrompt = Annotated[str, Field(max_length=20_000), FREE_TEXT]
Region = Annotated[str | None, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description=(
    "Data residency: only generation pools of this region serve the tenant"))]
Limit = Annotated[int | None, Field(ge=0, le=10**9)]
BigLimit = Annotated[int | None, Field(ge=0, le=10**15)]


class TenantQuotas(BaseModel):
    """Limits enforced by later layers; ``null`` means the tier's default."""

    model_config = ConfigDict(extra="forbid")

    rpm_limit: Limit = None
    tpm_limit: Limit = None
    max_concurrency: Limit = None
    monthly_token_budget: BigLimit = None
    max_output_tokens: Limit = None
    user_rpm_limit: Limit = None
    user_tpm_limit: Limit = None
    user_max_concurrency: Limit = None
    max_documents: Limit = None
    max_storage_bytes: BigLimit = None
    monthly_embedding_tokens: BigLimit = None
    monthly_call_limit: BigLimit = None


class TenantCreate(TenantQuotas):
    """A new tenant."""

    slug: Slug
    name: Name
    tier: Tier = Tier.free
    system_prompt: SystemPrompt = ""
    system_message_policy: SystemMessagePolicy = SystemMessagePolicy.append
    allowed_models: Annotated[list[ModelName], Field(max_length=50)] = []
    data_region: Region = None
    allow_spillover: bool = False


class TenantUpdate(TenantQuotas):
    """A partial update: only the fields sent are changed."""

    name: Name | None = None
    tier: Tier | None = None
    system_prompt: SystemPrompt | None = None
    system_message_policy: SystemMessagePolicy | None = None
    allowed_models: Annotated[list[ModelName] | None, Field(max_length=50)] = None
    data_region: Region = None
    allow_spillover: bool | None = None


class TenantOut(TenantQuotas):
    """A tenant as the operator sees it."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    slug: str
    name: str
    tier: Tier
    status: TenantStatus
    system_prompt: str
    system_message_policy: SystemMessagePolicy
    allowed_models: list[str]
    data_region: str | None
    allow_spillover: bool
    created_at: datetime
    updated_at: datetime


class TenantPage(BaseModel):
    """One page of tenants."""

    data: list[TenantOut]
    total: int
    limit: int
    offset: int
