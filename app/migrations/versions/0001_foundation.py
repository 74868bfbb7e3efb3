"""Foundation: tenants and API keys, with forced row-level security.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import force_rls

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# NULLIF: once a session has used SET LOCAL, the unset value reads back as '' not NULL.
HELPERS = (
    """CREATE OR REPLACE FUNCTION app_current_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid $$""",
    """CREATE OR REPLACE FUNCTION app_is_platform() RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT coalesce(current_setting('app.platform', true), '') = 'on' $$""",
)


def upgrade() -> None:
    for statement in HELPERS:
        op.execute(statement)
    op.create_table(
        "tenants",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("slug", sa.String(63), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("tier", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("system_prompt", sa.Text, nullable=False),
        sa.Column("allowed_models", pg.ARRAY(sa.String(200)), nullable=False,
                  server_default="{}"),
        sa.Column("rpm_limit", sa.Integer),
        sa.Column("tpm_limit", sa.Integer),
        sa.Column("max_concurrency", sa.Integer),
        sa.Column("monthly_token_budget", sa.BigInteger),
        sa.Column("max_output_tokens", sa.Integer),
        sa.Column("max_documents", sa.Integer),
        sa.Column("max_storage_bytes", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("tier IN ('free', 'pro', 'enterprise')", name="tenants_tier_valid"),
        sa.CheckConstraint("status IN ('active', 'suspended')", name="tenants_status_valid"),
    )
    force_rls("tenants", "id")

    op.create_table(
        "api_keys",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("tenant_id", pg.UUID(as_uuid=True),
                  sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False, unique=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("scopes", pg.ARRAY(sa.String(20)), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    force_rls("api_keys", "tenant_id")


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.execute("DROP FUNCTION IF EXISTS app_is_platform()")
    op.execute("DROP FUNCTION IF EXISTS app_current_tenant()")
