"""Alembic environment: runs on the owner connection handed over by app.db.migrate."""

from alembic import context
from sqlmodel import SQLModel

# Imported for their side effect: they register the tables on SQLModel.metadata.
import app.db.indexed
import app.db.models  # noqa: F401

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=SQLModel.metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
