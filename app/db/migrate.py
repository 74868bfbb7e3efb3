"""Schema migrations, run as the database owner.

Besides Alembic's upgrade this makes sure the app's own role exists as a plain login
role (no superuser, no BYPASSRLS) and holds only row privileges, so row-level security
always applies to the running app.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.settings import DatabaseSettings

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Records the app may add and read but never change or remove (the audit log).
APPEND_ONLY_TABLES = ("audit_events",)


class UnsafeAppRoleError(RuntimeError):
    """The app role could bypass row-level security; refuse to run."""


def alembic_config(connection: Connection) -> Config:
    """An Alembic config bound to an open owner connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _ensure_app_role(conn: Connection, settings: DatabaseSettings) -> None:
    role = settings.app_role
    exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    if exists is None:
        # Role names cannot be bound parameters; app_role is validated by a strict pattern.
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB'))
    if settings.app_password is not None:
        literal = settings.app_password.get_secret_value().replace("'", "''")
        conn.exec_driver_sql(f"ALTER ROLE \"{role}\" PASSWORD '{literal}'")
    row = conn.execute(
        text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :r"), {"r": role}
    ).one()
    if row.rolsuper or row.rolbypassrls:
        raise UnsafeAppRoleError(
            f"database role {role!r} is a superuser or has BYPASSRLS; row-level security "
            "would not apply. Use a plain role (DATABASE_APP_ROLE)."
        )


def _grant_row_privileges(conn: Connection, role: str) -> None:
    conn.execute(text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
    conn.execute(text(
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
    ))
    conn.execute(text(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    conn.execute(text(f'REVOKE ALL ON TABLE alembic_version FROM "{role}"'))
    for table in APPEND_ONLY_TABLES:
        conn.execute(text(f'REVOKE UPDATE, DELETE, TRUNCATE ON TABLE {table} FROM "{role}"'))


def _upgrade(conn: Connection, settings: DatabaseSettings) -> None:
    _ensure_app_role(conn, settings)
    command.upgrade(alembic_config(conn), "head")
    _grant_row_privileges(conn, settings.app_role)


async def migrate(settings: DatabaseSettings) -> None:
    """Bring the schema to head and (re)grant the app role; safe to run repeatedly."""
    engine = create_async_engine(settings.owner_url(), pool_size=1, max_overflow=0)
    try:
        async with engine.begin() as conn:
            # One migrator at a time across processes (several replicas may start together).
            await conn.execute(text("SELECT pg_advisory_xact_lock(724310001)"))
            await conn.run_sync(_upgrade, settings)
        log.info("database migrated to head")
    finally:
        await engine.dispose()
