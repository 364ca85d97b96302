"""Alembic environment of the app database: runs on the connection ``core.migrate`` hands in."""
from __future__ import annotations

from alembic import context

from core.migrate import VERSION_TABLE
from core.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
