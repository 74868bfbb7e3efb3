"""Usage quarantine: usage events the batch writer could not store, one row each with
the reason, for the operator to read (``GET /admin/usage/quarantine``) and replay.

An operator table, not a tenant table: ENABLEd and FORCEd row-level security with a
policy that admits the platform scope only, so a tenant scope sees and writes nothing
here. No foreign key to tenants: a deleted tenant can be the very reason, and the record
outlives it. Text is stored escaped (the writer turns NUL into ``\\u0000``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import ts

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_quarantine",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("tenant_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("error", sa.String(100), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("event", pg.JSONB, nullable=False),
        ts("created_at"),
    )
    op.create_index("ix_usage_quarantine_tenant", "usage_quarantine", ["tenant_id", "id"])
    op.execute("ALTER TABLE usage_quarantine ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE usage_quarantine FORCE ROW LEVEL SECURITY")
    op.execute("CREATE POLICY platform_only ON usage_quarantine "
               "USING (app_is_platform()) WITH CHECK (app_is_platform())")


def downgrade() -> None:
    op.drop_table("usage_quarantine")
