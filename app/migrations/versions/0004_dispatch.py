"""Dispatch: a tenant's data region (residency pin) and whether it may spill over from
its dedicated pool to a shared one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("data_region", sa.String(63), nullable=True))
    op.add_column("tenants", sa.Column("allow_spillover", sa.Boolean, nullable=False,
                                       server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("tenants", "allow_spillover")
    op.drop_column("tenants", "data_region")
