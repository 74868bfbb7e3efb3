"""Alembic migrations, run as the database owner by ``tenantrag migrate``."""
