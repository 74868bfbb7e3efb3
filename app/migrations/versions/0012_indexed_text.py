"""What was indexed, kept for the document detail routes: the extracted text of each
document's live version (``document_texts``) and its chunks with offsets, page, heading
path, token count and instruction-like reasons (``document_chunks``). Both are
tenant-owned with row-level security, and go with their document.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import force_rls, tenant_id

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("document_texts", "document_chunks")


def _document_id() -> sa.Column[object]:
    return sa.Column("document_id", pg.UUID(as_uuid=True),
                     sa.ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True)


def upgrade() -> None:
    op.create_table(
        "document_texts",
        _document_id(),
        sa.Column("version", sa.Integer, primary_key=True),
        tenant_id(),
        sa.Column("text", sa.Text, nullable=False),
    )
    op.create_table(
        "document_chunks",
        _document_id(),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("chunk_index", sa.Integer, primary_key=True),
        tenant_id(),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("char_start", sa.Integer, nullable=False),
        sa.Column("char_end", sa.Integer, nullable=False),
        sa.Column("page", sa.Integer),
        sa.Column("heading_path", pg.ARRAY(sa.Text), nullable=False),
        sa.Column("token_count", sa.Integer, nullable=False),
        sa.Column("instruction_reasons", pg.ARRAY(sa.Text), nullable=False),
    )
    for table in TABLES:
        force_rls(table)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
