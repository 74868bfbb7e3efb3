"""SQLModel tables. Request/response schemas live beside each domain, not here.

Every table with a ``tenant_id`` is tenant-owned and protected by row-level security
(see the migrations); ``tenants`` itself is visible to its own tenant and to the
platform scope only.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from decimal import Decimal
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


class SystemMessagePolicy(enum.StrEnum):
    """What happens to a ``system`` message sent by the caller of the chat API."""

    allow = "allow"  # used instead of the tenant's prompt (platform rules still apply)
    append = "append"  # added after the tenant's prompt
    refuse = "refuse"  # the request is refused with 400


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
    system_message_policy: SystemMessagePolicy = Field(
        default_factory=lambda: SystemMessagePolicy.append,
        sa_column=sa.Column(sa.String(10), nullable=False, server_default="append"),
    )
    allowed_models: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.ARRAY(sa.String(200)), nullable=False, server_default="{}"),
    )
    # Residency: only pools of this region serve the tenant (None = any region).
    data_region: str | None = Field(default=None, sa_column=sa.Column(sa.String(63),
                                                                      nullable=True))
    # May a saturated dedicated pool spill over to the shared pool of the tenant's tier?
    allow_spillover: bool = Field(default=False, sa_column=sa.Column(
        sa.Boolean, nullable=False, server_default=sa.false()))
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_concurrency: int | None = None
    monthly_token_budget: int | None = Field(default=None, sa_type=sa.BigInteger)
    max_output_tokens: int | None = None
    # Per end user (the chat request's `user`); None = no per-user limit.
    user_rpm_limit: int | None = None
    user_tpm_limit: int | None = None
    user_max_concurrency: int | None = None
    max_documents: int | None = None
    max_storage_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    # Tokens embedded by ingestion per calendar month (UTC); None = the tier's default.
    monthly_embedding_tokens: int | None = Field(default=None, sa_type=sa.BigInteger)
    # Chat calls admitted per calendar month (UTC); None = the tier's default.
    monthly_call_limit: int | None = Field(default=None, sa_type=sa.BigInteger)
    # Browsers: origins allowed to call the API with the tenant's embed tokens.
    cors_origins: list[str] = Field(default_factory=list, sa_column=sa.Column(
        pg.ARRAY(sa.Text), nullable=False, server_default="{}"))
    # Content rules: checked on the user's input and on the model's output as it streams.
    blocked_terms: list[str] = Field(default_factory=list, sa_column=sa.Column(
        pg.ARRAY(sa.Text), nullable=False, server_default="{}"))
    blocked_patterns: list[str] = Field(default_factory=list, sa_column=sa.Column(
        pg.ARRAY(sa.Text), nullable=False, server_default="{}"))
    disclaimer: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
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
    # Set by a rotation: the old key works until then (the overlap window).
    expires_at: datetime | None = Field(
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
    # Uploaded, or last sent to the workers (the relay holds some back: fair share).
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


class SystemPromptVersion(SQLModel, table=True):
    """Every system prompt a tenant has had: who set it and when. The newest is also
    kept on ``tenants.system_prompt`` for the chat path."""

    __tablename__ = "system_prompts"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(),
                                                             primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    version: int
    text: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_by: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class UnsettledPoints(SQLModel, table=True):
    """A document (or a whole knowledge base) whose stored points may hold versions
    that readers must not see: being ingested, replaced, or deleted. Search hides
    those versions; the row goes once the vector store holds only the live version."""

    __tablename__ = "unsettled_points"

    target_id: uuid.UUID = Field(sa_column=sa.Column(pg.UUID(as_uuid=True), primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    kind: str = Field(sa_column=sa.Column(sa.String(10), nullable=False))  # document | kb
    kb_id: uuid.UUID = Field(sa_column=sa.Column(pg.UUID(as_uuid=True), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class Conversation(SQLModel, table=True):
    """A chat thread of one end user of a tenant (``end_user`` '' = the key's caller)."""

    __tablename__ = "conversations"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    end_user: str = Field(default="", sa_column=sa.Column(sa.String(256), nullable=False))
    title: str = Field(default="", sa_column=sa.Column(sa.String(200), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class ConversationMessage(SQLModel, table=True):
    """One turn of a conversation; an assistant turn keeps the citations it was given."""

    __tablename__ = "conversation_messages"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(),
                                                             primary_key=True))
    conversation_id: uuid.UUID = Field(
        sa_column=sa.Column(pg.UUID(as_uuid=True),
                            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                            nullable=False)
    )
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    role: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    content: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    citations: list[dict[str, Any]] = Field(
        default_factory=list,
        sa_column=sa.Column(pg.JSONB, nullable=False, server_default="[]"),
    )
    request_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(100)))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class UsageEvent(SQLModel, table=True):
    """One metered request (chat or embedding), idempotent on (tenant, request id)."""

    __tablename__ = "usage_events"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "request_id", name="usage_events_request_unique"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(),
                                                              primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    request_id: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    kind: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    end_user: str = Field(default="", sa_column=sa.Column(sa.String(256), nullable=False))
    model: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    pool: str | None = Field(default=None, sa_column=sa.Column(sa.String(63)))
    replica: str | None = Field(default=None, sa_column=sa.Column(sa.String(500)))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    status: str = Field(sa_column=sa.Column(sa.String(30), nullable=False))
    cost_usd: Decimal = Field(default=Decimal(0), sa_column=sa.Column(
        pg.NUMERIC(18, 8), nullable=False))
    gpu_seconds: float | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


class ContentRuleHit(SQLModel, table=True):
    """A request or answer stopped by the tenant's blocklist (the rule, not the text)."""

    __tablename__ = "content_rule_hits"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(),
                                                              primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    request_id: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    end_user: str = Field(default="", sa_column=sa.Column(sa.String(256), nullable=False))
    direction: str = Field(sa_column=sa.Column(sa.String(10), nullable=False))
    rule: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


class AuditEvent(SQLModel, table=True):
    """One admin action or key operation, written in the same transaction as the change
    it records. Append-only: the app role may insert and read, never change or delete.
    ``tenant_id`` None = a platform-wide action (only the platform scope sees it); no
    foreign key, so the record outlives what it describes."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(),
                                                              primary_key=True))
    tenant_id: uuid.UUID | None = Field(default=None, sa_column=sa.Column(
        pg.UUID(as_uuid=True), nullable=True))
    actor: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    action: str = Field(sa_column=sa.Column(sa.String(50), nullable=False))
    target_type: str = Field(sa_column=sa.Column(sa.String(30), nullable=False))
    target_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(100)))
    details: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(
        pg.JSONB, nullable=False, server_default="{}"))
    request_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(100)))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class UsageQuarantine(SQLModel, table=True):
    """A usage event the writer could not store (a value PostgreSQL refuses, a tenant
    gone): set aside with the reason instead of failing its whole batch. An operator
    table: only the platform scope reads or writes it (no tenant policy); no foreign key,
    so it outlives the tenant. Its text is escaped (``\\u0000``) so it can be stored."""

    __tablename__ = "usage_quarantine"

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(),
                                                              primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=sa.Column(pg.UUID(as_uuid=True), nullable=False))
    request_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    kind: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    error: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    reason: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    event: dict[str, Any] = Field(sa_column=sa.Column(pg.JSONB, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
