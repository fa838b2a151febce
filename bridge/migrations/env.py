"""Alembic environment of the bridge journal: runs on the connection handed
in by bridge.migrate. Its version table is the bridge's own
(bridge_alembic_version), so a journal never mistakes an MIS revision for its own."""
from __future__ import annotations

from alembic import context

from bridge.journal.schema import metadata

VERSION_TABLE = "bridge_alembic_version"

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
