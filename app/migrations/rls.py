"""Building blocks that every migration creating a tenant table uses."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg


def force_rls(table: str, tenant_column: str = "tenant_id") -> None:
    """ENABLE and FORCE row-level security, with one policy for reads and writes."""
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    rule = f"({tenant_column} = app_current_tenant() OR app_is_platform())"
    op.execute(f"CREATE POLICY tenant_isolation ON {table} USING {rule} WITH CHECK {rule}")


def tenant_id() -> sa.Column[object]:
    """The owning tenant; rows go when the tenant goes."""
    return sa.Column("tenant_id", pg.UUID(as_uuid=True),
                     sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)


def ts(name: str, nullable: bool = False) -> sa.Column[object]:
    """A timezone-aware timestamp column."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)
