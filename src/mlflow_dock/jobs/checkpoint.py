"""SQLite checkpoints from a thread of their own, off the path of the commits being answered.

In WAL mode SQLite appends each commit to the write-ahead log and, by default, the commit
that takes the log over 1,000 pages also copies it into the database file and syncs it: that
one commit (and every delivery waiting on it) then takes as long as an fsync of megabytes.
Checkpointing every fraction of a second from this thread keeps the log below that size, so
commits stay appends; PASSIVE checkpoints never block a writer, and SQLite's own checkpoint
remains the fallback should this thread fall behind. Durability is unchanged: a checkpoint
syncs the log before it copies it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 0.25


class Checkpointer:
    """Calls `checkpoint` every `interval_seconds` between `start` and `stop`."""

    def __init__(
        self,
        checkpoint: Callable[[], None],
        *,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
    ) -> None:
        self._checkpoint = checkpoint
        self._interval = interval_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="store-checkpoint", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._checkpoint()
            except Exception as exc:
                # Not fatal: SQLite checkpoints on commit by itself meanwhile.
                logger.warning("store checkpoint failed: %s", exc)
