"""Knowledge bases, documents, their uploaded bytes, and the outbox; all under forced RLS.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import force_rls, tenant_id, ts

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("knowledge_bases", "documents", "document_contents", "outbox")


def upgrade() -> None:
    op.create_table(
        "knowledge_bases",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        tenant_id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        ts("created_at"), ts("updated_at"),
        sa.UniqueConstraint("tenant_id", "name", name="knowledge_bases_name_unique"),
    )
    op.create_table(
        "documents",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        tenant_id(),
        sa.Column("kb_id", pg.UUID(as_uuid=True),
                  sa.ForeignKey("knowledge_bases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("external_id", sa.String(256)),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metadata", pg.JSONB, nullable=False, server_default="{}"),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("chunk_count", sa.Integer),
        sa.Column("chunks_embedded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("live_version", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False),
        ts("created_at"), ts("updated_at"), ts("queued_at"),
        ts("processing_started_at", True), ts("ready_at", True),
        sa.CheckConstraint("status IN ('queued', 'processing', 'ready', 'failed')",
                           name="documents_status_valid"),
    )
    op.create_index("ix_documents_kb_sha", "documents", ["kb_id", "sha256"])
    op.create_index("ix_documents_tenant", "documents", ["tenant_id"])
    op.create_index("ix_documents_kb_external", "documents", ["kb_id", "external_id"],
                    unique=True, postgresql_where=sa.text("external_id IS NOT NULL"))
    op.create_index("ix_documents_stuck", "documents", ["status", "updated_at"],
                    postgresql_where=sa.text("status IN ('queued', 'processing')"))
    op.create_table(
        "document_contents",
        sa.Column("document_id", pg.UUID(as_uuid=True),
                  sa.ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        tenant_id(),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        tenant_id(),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("args", pg.JSONB, nullable=False),
        ts("created_at"),
    )
    for table in TABLES:
        force_rls(table)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
