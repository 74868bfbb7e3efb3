"""Usage metering: one row per request (idempotent on the tenant's request id), and
per-end-user limits a tenant may set.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import force_rls, tenant_id, ts

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("user_rpm_limit", "user_tpm_limit", "user_max_concurrency"):
        op.add_column("tenants", sa.Column(column, sa.Integer, nullable=True))
    op.create_table(
        "usage_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        tenant_id(),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("end_user", sa.String(256), nullable=False, server_default=""),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("pool", sa.String(63)),
        sa.Column("replica", sa.String(500)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("status", sa.String(30), nullable=False),
        sa.Column("cost_usd", pg.NUMERIC(18, 8), nullable=False, server_default="0"),
        sa.Column("gpu_seconds", sa.Float),
        ts("created_at"),
        sa.UniqueConstraint("tenant_id", "request_id", name="usage_events_request_unique"),
    )
    op.create_index("ix_usage_events_time", "usage_events", ["tenant_id", "created_at"])
    force_rls("usage_events")


def downgrade() -> None:
    op.drop_table("usage_events")
    for column in ("user_max_concurrency", "user_tpm_limit", "user_rpm_limit"):
        op.drop_column("tenants", column)
