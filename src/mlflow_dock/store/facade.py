"""`JobStore`: every part of the store on one `Database`, for the composition root and tests.

Callers elsewhere type what they use with a Protocol of their own (a worker's claims and
outcomes, intake's deliveries, the board's reads); only app.py builds and holds this.
"""

from __future__ import annotations

from mlflow_dock.store.database import Database
from mlflow_dock.store.deliveries import Deliveries
from mlflow_dock.store.dispatch import DispatchMarks
from mlflow_dock.store.locks import NamedLocks
from mlflow_dock.store.loglines import LogLines
from mlflow_dock.store.meta import RuntimeMemory
from mlflow_dock.store.migrate import upgrade
from mlflow_dock.store.queue import JobQueue
from mlflow_dock.store.reads import JobReads
from mlflow_dock.store.tags import TagOutbox
from mlflow_dock.store.telemetry import Telemetry


class JobStore(
    JobReads,
    Deliveries,
    JobQueue,
    DispatchMarks,
    TagOutbox,
    NamedLocks,
    RuntimeMemory,
    LogLines,
    Telemetry,
):
    """The parts share one `Database` (one engine, one SQLite write lock)."""

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        """Open the database at `url` and bring its schema to the newest revision."""
        database = Database.from_url(url)
        try:
            upgrade(database)
        except BaseException:
            database.close()
            raise
        return cls(database)

    @property
    def database(self) -> Database:
        """The shared database, for other tables' parts (the layer cache) to work on."""
        return self._db

    def checkpoint(self) -> None:
        self._db.checkpoint()

    def ping(self) -> None:
        self._db.ping()

    def close(self) -> None:
        self._db.close()
