"""Credential changes are announced: a trigger on tenants and api_keys sends
``NOTIFY tenantrag_auth, '<tenant id>'`` when a tenant changes or goes, or a key is
revoked, rescoped or deleted, so every API process drops what it cached about that
tenant's credentials at once (see app/auth/cache.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "tenantrag_auth"


def upgrade() -> None:
    op.execute(f"""
        CREATE FUNCTION app_notify_tenant_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('{CHANNEL}', COALESCE(NEW.id, OLD.id)::text);
          RETURN NULL;
        END $$""")
    op.execute(f"""
        CREATE FUNCTION app_notify_key_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('{CHANNEL}', COALESCE(NEW.tenant_id, OLD.tenant_id)::text);
          RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER tenants_notify_auth AFTER UPDATE OR DELETE ON tenants
        FOR EACH ROW EXECUTE FUNCTION app_notify_tenant_changed()""")
    # last_used_at is written on use: not a change anyone needs to hear about.
    op.execute("""
        CREATE TRIGGER api_keys_notify_auth
        AFTER UPDATE OF revoked_at, scopes, secret_hash, tenant_id OR DELETE ON api_keys
        FOR EACH ROW EXECUTE FUNCTION app_notify_key_changed()""")


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_notify_auth ON api_keys")
    op.execute("DROP TRIGGER tenants_notify_auth ON tenants")
    op.execute("DROP FUNCTION app_notify_key_changed()")
    op.execute("DROP FUNCTION app_notify_tenant_changed()")
