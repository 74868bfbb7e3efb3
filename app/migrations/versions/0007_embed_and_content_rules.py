"""Browsers and content rules: a tenant's allowed CORS origins (for embed tokens), its
blocklist (terms and regular expressions) and disclaimer, a record of every blocklist
hit, and key expiry (a rotated key stays valid for an overlap window).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from app.migrations.rls import force_rls, tenant_id, ts

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("cors_origins", "blocked_terms", "blocked_patterns"):
        op.add_column("tenants", sa.Column(column, pg.ARRAY(sa.Text), nullable=False,
                                           server_default="{}"))
    op.add_column("tenants", sa.Column("disclaimer", sa.Text, nullable=True))
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True),
                                        nullable=True))
    # An expiry set by a rotation is announced like a revocation (see 0006).
    op.execute("DROP TRIGGER api_keys_notify_auth ON api_keys")
    op.execute("""
        CREATE TRIGGER api_keys_notify_auth
        AFTER UPDATE OF revoked_at, expires_at, scopes, secret_hash, tenant_id OR DELETE
        ON api_keys FOR EACH ROW EXECUTE FUNCTION app_notify_key_changed()""")
    op.create_table(
        "content_rule_hits",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        tenant_id(),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("end_user", sa.String(256), nullable=False, server_default=""),
        sa.Column("direction", sa.String(10), nullable=False),  # input | output
        sa.Column("rule", sa.Text, nullable=False),
        ts("created_at"),
    )
    op.create_index("ix_content_rule_hits_time", "content_rule_hits",
                    ["tenant_id", "created_at"])
    force_rls("content_rule_hits")


def downgrade() -> None:
    op.drop_table("content_rule_hits")
    op.execute("DROP TRIGGER api_keys_notify_auth ON api_keys")
    op.execute("""
        CREATE TRIGGER api_keys_notify_auth
        AFTER UPDATE OF revoked_at, scopes, secret_hash, tenant_id OR DELETE ON api_keys
        FOR EACH ROW EXECUTE FUNCTION app_notify_key_changed()""")
    op.drop_column("api_keys", "expires_at")
    op.drop_column("tenants", "disclaimer")
    for column in ("blocked_patterns", "blocked_terms", "cors_origins"):
        op.drop_column("tenants", column)
