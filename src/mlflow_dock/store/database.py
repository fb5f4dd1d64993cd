"""The one database object the store's parts share: engine, sessions, write lock, dialect facts.

Every part of the store (and the native builder's layer cache) works through one `Database`,
so a process holds one connection pool per database URL and one SQLite write lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from mlflow_dock.store.schema import JobRow

_T = TypeVar("_T")


def store_unavailable(exc: BaseException) -> bool:
    """Is this the database being unreachable (restarting, failing over), not a bug?"""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout)


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            # WAL lets the API read while a worker writes; synchronous=NORMAL is still durable
            # across process crashes (only an OS crash can lose the last transaction).
            _enter_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if url.startswith(("postgresql://", "postgres://")):
        # The driver the project ships is psycopg 3; SQLAlchemy's default would be psycopg2.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    # pre_ping: connections survive a database restart (the next checkout reconnects).
    return create_engine(url, pool_pre_ping=True)


def _enter_wal(cursor: Any, patience_seconds: float = 30.0) -> None:
    """Switch the file to WAL, waiting out another process that holds it.

    Entering WAL needs the database to itself for a moment, and SQLite answers "database is
    locked" at once instead of waiting its busy timeout when another process is writing (a
    replica migrating a new file while this one starts). Once the file is in WAL this is a
    no-op that never waits.
    """
    deadline = time.monotonic() + patience_seconds
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(0.5, delay * 2)


def racing(operation: Callable[[], _T]) -> _T:
    """Run a write that may lose a race on a unique key to another process, up to three times.

    Two replicas accepting the same delivery (or the same version) at once: the loser's INSERT
    hits a unique key, and running it again finds the winner's row.
    """
    for _ in range(2):
        try:
            return operation()
        except IntegrityError:
            continue
    return operation()


class Database:
    """One database: its engine, a session factory and the process's write lock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        # SQLite allows one writer; serialising our own writes avoids "database is locked"
        # retries. Cross-process safety still comes from the conditional UPDATEs.
        self.write_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> Database:
        """The database at `url`, not yet migrated (see `mlflow_dock.store.migrate.upgrade`)."""
        return cls(create_db_engine(url))

    @property
    def dialect(self) -> str:
        """ "sqlite", "postgresql", ...: what the few dialect-specific statements depend on."""
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Session]:
        """An ORM session in one write transaction, committed when the block ends."""
        with self.write_lock, self.sessions.begin() as session:
            yield session

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A plain connection in one write transaction: for core statements on hot paths."""
        with self.write_lock, self.engine.begin() as connection:
            yield connection

    def read(self) -> Session:
        """A session for reads (use as a context manager)."""
        return self.sessions()

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database without blocking writers (PASSIVE).

        Nothing to do for other databases. See jobs/checkpoint.py for why it runs apart.
        """
        if self.dialect == "sqlite":
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def ping(self) -> None:
        """One cheap read of the jobs table (readiness probes); raises if the store is down."""
        with self.read() as session:
            session.execute(select(JobRow.id).limit(1)).first()

    def close(self) -> None:
        self.engine.dispose()


class Part:
    """A part of the store (one concern): works through the shared `Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db
