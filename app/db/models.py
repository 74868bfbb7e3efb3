"""SQLModel tables. Request/response schemas live beside each domain, not here.

Every table with a ``tenant_id`` is tenant-owned and protected by row-level security
(see the migrations); ``tenants`` itself is visible to its own tenant and to the
platform scope only.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Timezone-aware now, for defaults."""
    return datetime.now(UTC)


class Tier(enum.StrEnum):
    """Commercial tier: decides the shared pool, fair-queue weight and default limits."""

    free = "free"
    pro = "pro"
    enterprise = "enterprise"


class TenantStatus(enum.StrEnum):
    """A suspended tenant's keys are refused with 403."""

    active = "active"
    suspended = "suspended"


class Tenant(SQLModel, table=True):
    """A customer of the platform; owns knowledge bases, keys and usage."""

    __tablename__ = "tenants"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    slug: str = Field(sa_column=sa.Column(sa.String(63), nullable=False, unique=True))
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    tier: Tier = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    status: TenantStatus = Field(
        default=TenantStatus.active, sa_column=sa.Column(sa.String(20), nullable=False)
    )
    system_prompt: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False))
    allowed_models: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.ARRAY(sa.String(200)), nullable=False, server_default="{}"),
    )
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_concurrency: int | None = None
    monthly_token_budget: int | None = Field(default=None, sa_type=sa.BigInteger)
    max_output_tokens: int | None = None
    max_documents: int | None = None
    max_storage_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


class ApiKey(SQLModel, table=True):
    """A tenant API key. Only an HMAC of the secret is stored; ``prefix`` finds the row."""

    __tablename__ = "api_keys"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    name: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    prefix: str = Field(sa_column=sa.Column(sa.String(16), nullable=False, unique=True))
    secret_hash: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    scopes: list[str] = Field(
        sa_column=sa.Column(pg.ARRAY(sa.String(20)), nullable=False)
    )
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    last_used_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
