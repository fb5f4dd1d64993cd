"""Keeping the database at the newest schema revision, with Alembic, at every start.

`upgrade` handles three kinds of database: empty (every revision runs), made by a version
before Alembic (its tables but no version table: brought up to revision 0001 as the old
start-up would have, stamped 0001, then upgraded), and at an older revision (upgraded).

Replicas start together: each takes the migration lock first (PostgreSQL: a transaction-scoped
advisory lock; SQLite: the database's write lock, `BEGIN IMMEDIATE`), migrates and checks
inside that one transaction, and commits. The next one in finds the schema at head and has
nothing to do; DDL never races.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Table, func, inspect, select, update
from sqlalchemy.engine import Connection

from mlflow_dock.errors import ConfigError
from mlflow_dock.store.database import Database
from mlflow_dock.store.migrations import baseline

logger = logging.getLogger(__name__)

# Not Alembic's default `alembic_version`: MLflow keeps its own history there, and the two may
# share a database.
VERSION_TABLE = "mlflow_dock_alembic_version"
SCRIPTS = Path(__file__).resolve().parent / "migrations"
# The PostgreSQL advisory lock key of the migration lock ("mlfd" in ASCII).
MIGRATION_LOCK_KEY = 0x6D6C6664


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for running commands on `connection` (in its transaction)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = connection
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the database to `revision` (the newest by default); safe for replicas at once."""
    if revision == "head" and at_head(db):
        return  # the common start: no lock taken, so running replicas' writes never wait
    with db.engine.connect() as connection, _migration_lock(connection) as locked:
        _refuse_unknown_revisions(locked)
        config = alembic_config(locked)
        present = set(inspect(locked).get_table_names())
        if VERSION_TABLE not in present and present & set(baseline.tables().tables):
            logger.info("adopting a job store made before schema migrations (revision 0001)")
            adopt_pre_alembic(locked, present)
            command.stamp(config, baseline.REVISION)
        command.upgrade(config, revision)


def at_head(db: Database) -> bool:
    """Is the database at the newest revision already? (A read; decides nothing under a lock.)"""
    with db.engine.connect() as connection:
        current = set(_current_revisions(connection))
    return current == set(_scripts().get_heads())


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(SCRIPTS))


def _current_revisions(connection: Connection) -> tuple[str, ...]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_heads()


def _refuse_unknown_revisions(connection: Connection) -> None:
    # A newer mlflow-dock migrated this database and an older one starts on it (a rollback):
    # say so in one line rather than with Alembic's traceback about a missing revision.
    known = {script.revision for script in _scripts().walk_revisions()}
    unknown = [revision for revision in _current_revisions(connection) if revision not in known]
    if unknown:
        raise ConfigError(
            f"MLFLOW_DOCK_DATABASE_URL: the job store's schema is at revision {unknown[0]}, "
            f"newer than this version of mlflow-dock knows (up to {_scripts().get_current_head()});"
            " run the version that migrated it"
        )


@contextmanager
def _migration_lock(connection: Connection) -> Iterator[Connection]:
    """One transaction on `connection`, holding the lock that lets one migrator in at a time."""
    dialect = connection.dialect.name
    if dialect == "sqlite":
        # pysqlite opens transactions lazily (never before DDL or a read), so the transaction
        # is ours to open: IMMEDIATE takes the write lock at once, and another process's
        # BEGIN IMMEDIATE waits for it (the busy timeout) instead of reading a stale schema.
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")
        return
    with connection.begin():
        if dialect == "postgresql":
            # Released with the transaction, by commit or by a dropped connection.
            connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        yield connection


def adopt_pre_alembic(connection: Connection, present: set[str]) -> None:
    """What the start-up before Alembic did besides `create_all`, up to revision 0001's schema.

    Creates the tables the database lacks (older versions had fewer; the layer cache's table
    appeared with the first native build), adds the nullable columns older versions lacked,
    and rewrites build keys from their NUL-separated form.
    """
    wanted = baseline.tables()
    operations = Operations(MigrationContext.configure(connection))
    inspector = inspect(connection)
    columns = {
        name: {column["name"] for column in inspector.get_columns(name)}
        for name in present & set(wanted.tables)
    }
    for name, existing in columns.items():
        # Only nullable columns were ever added to a released table (the old start-up could add
        # no other): a table without all the NOT NULL ones is someone else's, e.g. MLflow's own
        # `jobs` when both point at one schema. Leave it alone.
        lacking = sorted(c.name for c in wanted.tables[name].columns if not c.nullable)
        lacking = [column for column in lacking if column not in existing]
        if lacking:
            raise ConfigError(
                f"MLFLOW_DOCK_DATABASE_URL: the database has a table {name!r} that is not the"
                f" job store's (it lacks {', '.join(lacking)}; MLflow's own?); give the job store"
                " a database or schema of its own"
            )
    for table in wanted.sorted_tables:
        if table.name not in present:
            table.create(connection)
            continue
        for column in table.columns:
            if column.name not in columns[table.name]:
                operations.add_column(table.name, Column(column.name, column.type))
    _rewrite_build_keys(connection, wanted.tables["jobs"])


def _rewrite_build_keys(connection: Connection, jobs: Table) -> None:
    rows = connection.execute(
        select(jobs.c.id, jobs.c.model_name, jobs.c.version).where(
            jobs.c.kind == "build",
            jobs.c.dedupe_key.is_not(None),
            ~jobs.c.dedupe_key.startswith("["),
        )
    ).all()
    for row in rows:
        connection.execute(
            update(jobs)
            .where(jobs.c.id == row.id)
            .values(dedupe_key=baseline.build_key(row.model_name, row.version))
        )
