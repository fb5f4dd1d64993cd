"""Alembic's environment: migrations run on the connection `store.migrate.upgrade` passes in.

Alembic executes this file for every command (that is its design, not work at import time):
`upgrade` has already opened the transaction and taken the migration lock on that connection.
"""

from __future__ import annotations

from alembic import context

from mlflow_dock.store.migrate import VERSION_TABLE
from mlflow_dock.store.schema import metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("the job store migrates through mlflow_dock.store.migrate.upgrade")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # Not `alembic_version`: the database may be shared with MLflow, whose own Alembic
        # history lives in that table.
        version_table=VERSION_TABLE,
        # SQLite alters tables by copying them; batch mode is how Alembic does that.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
