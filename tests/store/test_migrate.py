"""Schema migrations (Alembic): from empty, from the schema before Alembic, by replicas at once.

`legacy/*.sql` is the schema the code before Alembic created (its `create_all`, as each
database ran it), frozen as a fixture.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, create_engine, func, insert, inspect, select, text
from sqlalchemy.engine import Connection

from mlflow_dock.errors import ConfigError
from mlflow_dock.imaging.layercache import CachedLayer
from mlflow_dock.jobs.model import JobState, build_key
from mlflow_dock.store.database import Database
from mlflow_dock.store.facade import JobStore
from mlflow_dock.store.layercache import StoredLayerCache
from mlflow_dock.store.migrate import (
    MIGRATION_LOCK_KEY,
    SCRIPTS,
    VERSION_TABLE,
    alembic_config,
    upgrade,
)
from mlflow_dock.store.migrations import baseline
from mlflow_dock.store.schema import metadata

LEGACY = Path(__file__).resolve().parent / "legacy"
DIGEST_A = "sha256:" + "a" * 64


def create_pre_alembic_schema(url: str) -> None:
    """The tables as the code before Alembic left them (its `create_all`, frozen as SQL)."""
    engine = create_engine(url)
    script = (LEGACY / f"{engine.dialect.name}.sql").read_text()
    with engine.begin() as connection:
        for statement in script.split(";"):
            if statement.strip():
                connection.exec_driver_sql(statement)
    engine.dispose()


def catalog(connection: Connection) -> list[tuple[str, ...]]:
    """Every table, column, constraint and index as the database describes it."""
    if connection.dialect.name == "sqlite":
        return sorted(
            (kind, name, re.sub(r"\s+", " ", sql or ""))
            for kind, name, sql in connection.exec_driver_sql(
                "SELECT type, name, sql FROM sqlite_master WHERE tbl_name != ?", (VERSION_TABLE,)
            )
        )
    columns = connection.execute(
        text(
            "SELECT table_name, column_name, data_type, character_maximum_length::text,"
            " is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name != :version"
        ),
        {"version": VERSION_TABLE},
    )
    constraints = connection.execute(
        text(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = current_schema()::regnamespace"
            " AND conrelid::regclass::text != :version"
        ),
        {"version": VERSION_TABLE},
    )
    indexes = connection.execute(
        text(
            "SELECT tablename, indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = current_schema() AND tablename != :version"
        ),
        {"version": VERSION_TABLE},
    )
    return sorted(
        tuple(str(value) for value in row)
        for rows in (columns, constraints, indexes)
        for row in rows
    )


def differences(connection: Connection, target: MetaData = metadata) -> list[object]:
    """What alembic's autogenerate would still have to do for the database to match `target`."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return list(compare_metadata(context, target))


def revision_of(db: Database) -> str | None:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head() -> str | None:
    return ScriptDirectory(str(SCRIPTS)).get_current_head()


def test_an_empty_database_is_upgraded_to_the_models(store_url):
    db = Database.from_url(store_url)
    upgrade(db)
    assert revision_of(db) == head()
    with db.engine.connect() as connection:
        assert differences(connection) == []
        # The comparison does see a difference where there is one.
        changed = MetaData()
        for table in metadata.sorted_tables:
            table.to_metadata(changed)
        changed.tables["jobs"].append_column(Column("extra", Integer))
        assert differences(connection, changed) != []
    db.close()


def test_revision_0001_is_the_schema_made_before_alembic(store_url):
    """Table for table, column for column, every constraint and index, as the database says."""
    migrated = Database.from_url(store_url)
    upgrade(migrated, baseline.REVISION)
    with migrated.engine.connect() as connection:
        got = catalog(connection)
        # Same database, other tables: drop revision 0001's, then create the frozen SQL.
    with migrated.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
        assert set(inspect(connection).get_table_names()) <= {VERSION_TABLE}
    migrated.close()
    create_pre_alembic_schema(store_url)
    engine = create_engine(store_url)
    with engine.connect() as connection:
        assert catalog(connection) == got
    engine.dispose()


def _fill_pre_alembic_database(url: str) -> dict[str, object]:
    """A few rows of every table, written as the code before Alembic wrote them."""
    engine = create_engine(url)
    tables = MetaData()
    tables.reflect(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    build = {
        "id": "00000000-0000-0000-0000-000000000001",
        "kind": "build",
        "dedupe_key": build_key("m", "1"),
        "model_name": "m",
        "version": "1",
        "state": "succeeded",
        "attempts": 1,
        "created_at": now - timedelta(minutes=5),
        "updated_at": now,
        "started_at": now - timedelta(minutes=4),
        "finished_at": now,
        "image": "reg/m:1",
        "digest": DIGEST_A,
        "tags_json": '["reg/m:1"]',
        "permanent": False,
    }
    alias = {
        "id": "00000000-0000-0000-0000-000000000002",
        "kind": "alias",
        "model_name": "m",
        "version": "1",
        "alias": "champion",
        "depends_on": build["id"],
        "state": "queued",
        "attempts": 0,
        "created_at": now - timedelta(minutes=1),
        "updated_at": now - timedelta(minutes=1),
        "tags_json": "[]",
        "permanent": False,
    }
    rows: dict[str, list[dict[str, object]]] = {
        "jobs": [build, alias],
        "deliveries": [{"delivery_id": "d1", "job_id": build["id"], "received_at": now}],
        "tag_writes": [
            {
                "model_name": "m",
                "version": "1",
                "tag": "mlflow_dock.status",
                "value": "succeeded",
                "revision": 2,
                "attempts": 0,
            }
        ],
        "locks": [
            {"name": "leader", "owner": "old-replica", "expires_at": now + timedelta(days=1)}
        ],
        "meta": [{"key": "watch_since", "value": (now - timedelta(days=3)).isoformat()}],
        "job_steps": [
            {
                "job_id": build["id"],
                "attempt": 1,
                "name": "build",
                "started_at": now - timedelta(minutes=4),
                "seconds": 42.5,
                "outcome": "ok",
            }
        ],
        "job_attempts": [
            {
                "job_id": build["id"],
                "attempt": 1,
                "kind": "build",
                "outcome": "succeeded",
                "finished_at": now,
                "bytes_uploaded": 5_000_000_000,
                "bytes_mounted": 0,
                "bytes_present": 7,
            }
        ],
        "job_log_lines": [
            {"job_id": build["id"], "line": "first"},
            {"job_id": build["id"], "line": "second"},
        ],
        "native_layers": [
            {
                "host": "reg",
                "key": "k" * 64,
                "digest": DIGEST_A,
                "diff_id": "sha256:" + "b" * 64,
                "size": 3,
                "repository": "team/m",
                "label": "numpy==2.0",
                "updated": now,
            }
        ],
    }
    with engine.begin() as connection:
        for name, values in rows.items():  # one by one: rows of one table set other columns
            for row in values:
                connection.execute(insert(tables.tables[name]).values(row))
    engine.dispose()
    return {"build": build["id"], "alias": alias["id"], "watch_since": now - timedelta(days=3)}


def test_a_database_made_before_alembic_is_adopted_with_its_rows(store_url):
    create_pre_alembic_schema(store_url)
    ids = _fill_pre_alembic_database(store_url)
    store = JobStore.from_url(store_url)
    assert revision_of(store.database) == head()
    with store.database.engine.connect() as connection:
        assert differences(connection) == []
    build = store.get(ids["build"])
    assert (build.state, build.image, build.digest, build.tags) == (
        JobState.SUCCEEDED,
        "reg/m:1",
        DIGEST_A,
        ("reg/m:1",),
    )
    assert store.build_for("m", "1").id == build.id
    assert store.job_for_delivery("d1").id == build.id
    assert store.request_build("m", "1", delivery_id="d1") == (build, False)
    assert [(w.tag, w.value, w.revision) for w in store.pending_tag_writes()] == [
        ("mlflow_dock.status", "succeeded", 2)
    ]
    assert store.lock_owner("leader") == "old-replica"
    assert store.watch_since() == ids["watch_since"]
    assert [(s.name, s.seconds) for s in store.steps_for([build.id])[build.id]] == [("build", 42.5)]
    figures = store.figures(bucket_bounds=[60])
    assert figures.blob_bytes["uploaded"] == 5_000_000_000
    assert figures.steps["build"] == ([1], 1, 42.5)
    assert store.log_tail(build.id, 5) == ["first", "second"]
    layer = StoredLayerCache(store.database).get("reg", "k" * 64)
    assert layer == CachedLayer(DIGEST_A, "sha256:" + "b" * 64, 3, "team/m")
    # The queue works on the adopted rows: the alias waited for its (succeeded) build.
    claimed = store.claim_next(owner="new-replica", lease_seconds=30)
    assert claimed is not None and claimed.id == ids["alias"]
    store.close()


def test_sqlite_store_from_nul_key_era_stays_readable(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    old = JobStore.from_url(url)
    job, _ = old.request_build("m", "1")
    with old.database.engine.begin() as connection:  # an older version's row
        connection.execute(
            text("UPDATE jobs SET dedupe_key = :k WHERE id = :i"),
            {"k": "build\x00m\x001", "i": job.id},
        )
        # ... and its schema, from before leases, write-back rows and schema migrations (so
        # also without the columns later revisions add).
        later = set(metadata.tables["jobs"].columns.keys()) - set(
            baseline.tables().tables["jobs"].columns.keys()
        )
        for column in ("owner", "lease_expires_at", "enqueued_at", *sorted(later)):
            connection.execute(text(f"ALTER TABLE jobs DROP COLUMN {column}"))
        connection.execute(text(f"DROP TABLE {VERSION_TABLE}"))
    old.close()
    reopened = JobStore.from_url(url)
    assert reopened.build_for("m", "1").id == job.id
    assert reopened.request_build("m", "1")[0].id == job.id
    reopened.close()


def test_tables_an_older_version_lacked_are_created_when_adopting(store_url):
    create_pre_alembic_schema(store_url)
    engine = create_engine(store_url)
    with engine.begin() as connection:
        for table in ("native_layers", "job_attempts", "job_steps", "job_log_lines"):
            connection.execute(text(f"DROP TABLE {table}"))
        connection.execute(text("ALTER TABLE tag_writes DROP COLUMN last_error"))
    engine.dispose()
    db = Database.from_url(store_url)
    upgrade(db)
    with db.engine.connect() as connection:
        assert differences(connection) == []
    db.close()


def test_a_jobs_table_that_is_not_ours_is_left_alone(store_url):
    """MLflow has a `jobs` table too: pointed at MLflow's schema, the store refuses to start."""
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE jobs (id VARCHAR(36) PRIMARY KEY, job_name VARCHAR(500) NOT NULL)")
        )
    with pytest.raises(ConfigError, match="table 'jobs' that is not the job store's"):
        JobStore.from_url(store_url)
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"jobs"}
        assert [c["name"] for c in inspect(connection).get_columns("jobs")] == ["id", "job_name"]
    engine.dispose()


def test_the_frozen_build_key_is_todays():
    """Revision 0001 rewrites keys with its own copy: a new key format needs a new revision."""
    for model, version in [("m", "1"), ('a"b', "2"), ("ünï,x", "3")]:
        assert baseline.build_key(model, version) == build_key(model, version)


def test_a_database_shared_with_mlflow_keeps_mlflows_alembic_history(store_url):
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        connection.execute(text("INSERT INTO alembic_version VALUES ('mlflows0001')"))
    engine.dispose()
    store = JobStore.from_url(store_url)
    with store.database.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("mlflows0001",)
        ]
    assert revision_of(store.database) == head()
    store.close()


def test_a_schema_newer_than_this_version_is_refused_in_one_line(store_url):
    db = Database.from_url(store_url)
    upgrade(db)
    with db.engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(ConfigError, match="revision 9999, newer than this version"):
        upgrade(db)
    db.close()


def test_downgrading_and_upgrading_again_round_trips(store_url):
    db = Database.from_url(store_url)
    upgrade(db)
    with db.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
        assert set(inspect(connection).get_table_names()) <= {VERSION_TABLE}
    upgrade(db)
    with db.engine.connect() as connection:
        assert differences(connection) == []
    db.close()


def test_replicas_starting_together_all_open_the_store(store_url):
    opened: list[JobStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            opened.append(JobStore.from_url(store_url))
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 4
    for s in opened:
        s.close()


_MIGRATOR = """
import pathlib, sys, time
from mlflow_dock.store.database import Database
from mlflow_dock.store.migrate import upgrade

url, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
db = Database.from_url(url)
ready.touch()
while not go.exists():
    time.sleep(0.001)
upgrade(db)
db.close()
"""


@pytest.mark.parametrize("start", ["empty", "pre-alembic"])
def test_processes_migrating_one_database_at_once(store_url, tmp_path, start):
    """Replica processes start at the same moment; each migrates, none fails, nothing doubles."""
    if start == "pre-alembic":
        create_pre_alembic_schema(store_url)
        ids = _fill_pre_alembic_database(store_url)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATOR, store_url, str(flag), str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(errors)
    db = Database.from_url(store_url)
    assert revision_of(db) == head()
    with db.engine.connect() as connection:
        assert differences(connection) == []
        assert (
            connection.execute(select(func.count()).select_from(text(VERSION_TABLE))).scalar() == 1
        )
    db.close()
    if start == "pre-alembic":
        store = JobStore.from_url(store_url)
        assert {job.id for job in store.list()} == {ids["build"], ids["alias"]}
        store.close()


def test_an_upgrade_waits_for_the_migration_lock(store_url, tmp_path):
    """While another replica migrates (holds the lock), a second one waits for it to finish."""
    db = Database.from_url(store_url)
    with db.engine.connect():
        pass  # the SQLite file exists (in WAL mode) before the other replica locks it
    if db.dialect == "sqlite":
        other = sqlite3.connect(str(tmp_path / "jobs.db"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        release = lambda: other.execute("COMMIT")  # noqa: E731
    else:
        engine = create_engine(store_url)
        holder = engine.connect()
        transaction = holder.begin()
        holder.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        release = transaction.commit
    migrating = threading.Thread(target=upgrade, args=(db,))
    migrating.start()
    migrating.join(1.0)
    assert migrating.is_alive() and revision_of(db) is None
    release()
    migrating.join(60)
    assert not migrating.is_alive() and revision_of(db) == head()
    if db.dialect != "sqlite":
        holder.close()
        engine.dispose()
    db.close()


def test_revision_0002_modelcar_keeps_jobs_and_adds_their_modelcar(store_url):
    db = Database.from_url(store_url)
    upgrade(db, "0001")
    now = datetime.now(UTC)
    jobs = baseline.tables().tables["jobs"]
    with db.engine.begin() as connection:
        connection.execute(
            insert(jobs).values(
                id="j1",
                kind="build",
                dedupe_key=build_key("m", "1"),
                model_name="m",
                version="1",
                state=JobState.SUCCEEDED.value,
                attempts=1,
                created_at=now,
                updated_at=now,
                tags_json="[]",
                permanent=False,
                digest=DIGEST_A,
            )
        )
    upgrade(db, "0002_modelcar")
    store = JobStore(db)
    job = store.build_for("m", "1")
    assert job is not None and job.digest == DIGEST_A
    assert (job.modelcar, job.v2_model) == (None, None)  # older images have neither
    db.close()
