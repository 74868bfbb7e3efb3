"""Audit log: one row per admin action or key operation, readable by the tenant's own
admins and by the operator. Append-only for the app role (``tenantrag migrate`` grants
it INSERT and SELECT on this table, nothing else; see app/db/migrate.py).

``tenant_id`` is NULL for platform-wide actions: the usual policy already hides those
rows from every tenant (``NULL = app_current_tenant()`` is never true) and shows them to
the platform scope, and a tenant scope cannot write one (WITH CHECK). No foreign key to
tenants: the record outlives what it describes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import force_rls, ts

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("tenant_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(50), nullable=False),
        sa.Column("target_type", sa.String(30), nullable=False),
        sa.Column("target_id", sa.String(100)),
        sa.Column("details", pg.JSONB, nullable=False, server_default="{}"),
        sa.Column("request_id", sa.String(100)),
        ts("created_at"),
    )
    # Pages are read newest first by id, per tenant (its admins) or across tenants.
    op.create_index("ix_audit_events_tenant", "audit_events", ["tenant_id", "id"])
    op.create_index("ix_audit_events_time", "audit_events", ["created_at"])
    force_rls("audit_events")


def downgrade() -> None:
    op.drop_table("audit_events")
