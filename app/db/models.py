"""SQLModel tables. Request/response schemas live beside each domain, not here.

Every table with a ``tenant_id`` is tenant-owned and protected by row-level security
(see the migrations); ``tenants`` itself is visible to its own tenant and to the
platform scope only.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

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


def _tenant_fk() -> sa.Column[uuid.UUID]:
    return sa.Column(
        pg.UUID(as_uuid=True), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )


def _timestamp(nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(sa.DateTime(timezone=True), nullable=nullable)


class KnowledgeBase(SQLModel, table=True):
    """A named set of a tenant's documents; chat can search one or several."""

    __tablename__ = "knowledge_bases"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    description: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class DocumentStatus(enum.StrEnum):
    """queued -> processing -> ready | failed."""

    queued = "queued"
    processing = "processing"
    ready = "ready"
    failed = "failed"


class Document(SQLModel, table=True):
    """One document of a knowledge base. ``version`` is the newest upload;
    ``live_version`` the one queries see (None until the first version is ready)."""

    __tablename__ = "documents"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    kb_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True),
            sa.ForeignKey("knowledge_bases.id", ondelete="CASCADE"),
            nullable=False,
        )
    )
    external_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(256)))
    filename: str = Field(sa_column=sa.Column(sa.String(512), nullable=False))
    format: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    size_bytes: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    sha256: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    doc_metadata: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=sa.Column("metadata", pg.JSONB, nullable=False, server_default="{}"),
    )
    status: DocumentStatus = Field(
        default=DocumentStatus.queued, sa_column=sa.Column(sa.String(20), nullable=False)
    )
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    chunk_count: int | None = None
    chunks_embedded: int = 0
    version: int = 1
    live_version: int | None = None
    attempts: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    queued_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    processing_started_at: datetime | None = Field(default=None, sa_column=_timestamp(True))
    ready_at: datetime | None = Field(default=None, sa_column=_timestamp(True))


class DocumentContent(SQLModel, table=True):
    """The uploaded bytes of one document version, kept until a newer version is live."""

    __tablename__ = "document_contents"

    document_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True),
            sa.ForeignKey("documents.id", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    version: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    data: bytes = Field(sa_column=sa.Column(sa.LargeBinary, nullable=False))


class OutboxMessage(SQLModel, table=True):
    """A message to send to the broker, written in the same transaction as the change
    that needs it; the relay in workers/ sends it and deletes the row."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(),
                                                             primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    actor: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    args: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
