"""Chat: system prompt history and policy, conversations, and the unsettled-points set
that lets search hide in-flight versions without listing every live document.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import force_rls, tenant_id, ts

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("system_prompts", "unsettled_points", "conversations", "conversation_messages")


def upgrade() -> None:
    op.add_column("tenants", sa.Column("system_message_policy", sa.String(10), nullable=False,
                                       server_default="append"))
    op.create_check_constraint("tenants_system_message_policy_valid", "tenants",
                               "system_message_policy IN ('allow', 'append', 'refuse')")
    op.create_table(
        "system_prompts",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        tenant_id(),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        ts("created_at"),
        sa.UniqueConstraint("tenant_id", "version", name="system_prompts_version_unique"),
    )
    op.create_table(
        "unsettled_points",
        sa.Column("target_id", pg.UUID(as_uuid=True), primary_key=True),
        tenant_id(),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("kb_id", pg.UUID(as_uuid=True), nullable=False),
        ts("created_at"),
        sa.CheckConstraint("kind IN ('document', 'kb')", name="unsettled_points_kind_valid"),
    )
    op.create_index("ix_unsettled_points_tenant", "unsettled_points", ["tenant_id"])
    # Documents that existed before this revision may still be mid-ingest.
    op.execute("""INSERT INTO unsettled_points (target_id, tenant_id, kind, kb_id, created_at)
                  SELECT id, tenant_id, 'document', kb_id, now() FROM documents
                  WHERE live_version IS DISTINCT FROM version""")
    op.create_table(
        "conversations",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        tenant_id(),
        sa.Column("end_user", sa.String(256), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        ts("created_at"), ts("updated_at"),
    )
    op.create_index("ix_conversations_owner", "conversations",
                    ["tenant_id", "end_user", "updated_at"])
    op.create_table(
        "conversation_messages",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("conversation_id", pg.UUID(as_uuid=True),
                  sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
        tenant_id(),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("citations", pg.JSONB, nullable=False, server_default="[]"),
        sa.Column("request_id", sa.String(100)),
        ts("created_at"),
    )
    op.create_index("ix_conversation_messages_conv", "conversation_messages",
                    ["conversation_id", "id"])
    for table in TABLES:
        force_rls(table)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
    op.drop_constraint("tenants_system_message_policy_valid", "tenants")
    op.drop_column("tenants", "system_message_policy")
