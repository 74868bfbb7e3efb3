"""A per-tenant monthly call quota: chat calls admitted per calendar month (UTC),
``NULL`` = the tier's default (app/quotas/policy.py).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-12
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("monthly_call_limit", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("tenants", "monthly_call_limit")
