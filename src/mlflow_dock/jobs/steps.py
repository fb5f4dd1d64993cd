"""Step timings and attempt records of running jobs, kept in the job store.

Why in the store and not in process memory: the board and `/metrics` must show the same truth
whichever replica serves them and wherever the worker ran, so every figure is derived from the
store at read time.

The runner is handed `enter_step` (a plain callable: "this job now enters step NAME") by the
composition root and never imports this module; the worker makes a `StepRecorder` current for
the job it runs, and `enter_step` records into whichever recorder is current in that thread (a
no-op outside a job, e.g. `mlflow-dock build`). Entering a step ends the previous one; the
step still open when the attempt ends failed if the attempt failed: that is its cause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# What a step's row says while it runs and how it ended.
STEP_RUNNING = "running"
STEP_OK = "ok"
STEP_FAILED = "failed"

# How an attempt ended; "retry" attempts are the retries counted by cause.
ATTEMPT_SUCCEEDED = "succeeded"
ATTEMPT_RETRY = "retry"
ATTEMPT_FAILED = "failed"
ATTEMPT_OUTCOMES = (ATTEMPT_SUCCEEDED, ATTEMPT_RETRY, ATTEMPT_FAILED)

# The cause recorded for an attempt cut short by a service restart.
CAUSE_INTERRUPTED = "interrupted"
CAUSE_OTHER = "other"

# Blob transfer outcomes reported by the registry client: sent, linked from another repository,
# or already there.
BLOB_OUTCOMES = ("uploaded", "mounted", "present")

# Steps the runner times, in the order they run, with the words the board uses for them.
STEP_NAMES: dict[str, str] = {
    "resolve": "resolving and downloading the model",
    "assemble": "assembling the image in the registry",
    "build": "building the image",
    "smoke": "the smoke test",
    "push": "publishing the image",
    "tag": "moving the alias tag",
    "untag": "removing the alias tag",
}


@dataclass(frozen=True)
class StepTiming:
    job_id: str
    attempt: int
    name: str
    started_at: datetime | None
    seconds: float | None
    outcome: str


@dataclass(frozen=True)
class StoreFigures:
    """Everything `/metrics` derives from the store, read in one go at scrape time."""

    jobs: Mapping[tuple[str, str], int]  # (kind, state) -> jobs now in that state
    # By lane ("build", "alias"): how many jobs are queued, and how long the one that has been
    # runnable longest has waited (0 when none is).
    queue_depth: Mapping[str, int]
    oldest_queued_seconds: Mapping[str, float]
    attempts: Mapping[tuple[str, str], int]  # (kind, outcome) -> attempts ever ended so
    retries: Mapping[str, int]  # cause -> attempts that ended in a retry
    smoke_failures: int
    # step -> (cumulative counts per bucket bound, count, sum)
    steps: Mapping[str, tuple[list[int], int, float]]
    blob_bytes: Mapping[str, int]  # uploaded / mounted / present -> bytes
    bucket_bounds: tuple[float, ...] = field(default=())


class StepLog(Protocol):
    """The store methods a recorder writes through (`store.telemetry.Telemetry`)."""

    def start_step(self, job_id: str, attempt: int, name: str) -> int: ...

    def finish_step(self, step_id: int, seconds: float, outcome: str) -> None: ...

    def record_attempt(
        self,
        job_id: str,
        attempt: int,
        *,
        kind: str,
        outcome: str,
        cause: str | None,
        blob_bytes: Mapping[str, int],
    ) -> None: ...


_current: ContextVar[StepRecorder | None] = ContextVar("mlflow_dock_step_recorder", default=None)


class StepRecorder:
    """Times the steps of one attempt of one job and records how the attempt ended.

    Recording never fails a job: a store error while writing a timing is logged and dropped.
    """

    def __init__(self, store: StepLog, *, job_id: str, attempt: int, kind: str) -> None:
        self._store = store
        self.job_id = job_id
        self.attempt = attempt
        self.kind = kind
        # The step open when the attempt failed: the cause of a retry or failure.
        self.failed_step: str | None = None
        self._open: tuple[str, int | None, float] | None = None
        self._lock = threading.Lock()
        self._bytes = dict.fromkeys(BLOB_OUTCOMES, 0)

    @contextmanager
    def active(self) -> Iterator[StepRecorder]:
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def enter(self, name: str) -> None:
        """End the open step (it went well: the runner moved on) and start `name`."""
        self._close(STEP_OK)
        step_id = self._quietly(lambda: self._store.start_step(self.job_id, self.attempt, name))
        self._open = (name, step_id, time.monotonic())

    def count_blob(self, outcome: str, size: int) -> None:
        """Called by the registry client (possibly from several threads) per blob."""
        with self._lock:
            self._bytes[outcome] = self._bytes.get(outcome, 0) + max(0, size)

    def fail_open(self) -> None:
        """Close the open step as failed now. Called before the job's outcome is stored: a
        reader who sees the job failed must also see which step failed, and `finish` runs
        only after the outcome is written."""
        if self._open is not None:
            self.failed_step = self._open[0]
        self._close(STEP_FAILED)

    def finish(self, outcome: str, *, cause: str | None = None) -> None:
        """Close the open step and record how the attempt ended (`cause`: override the step)."""
        if outcome != ATTEMPT_SUCCEEDED and self._open is not None:
            self.failed_step = self._open[0]
        self._close(STEP_OK if outcome == ATTEMPT_SUCCEEDED else STEP_FAILED)
        if outcome != ATTEMPT_SUCCEEDED:
            cause = cause or self.failed_step or CAUSE_OTHER
        with self._lock:
            transferred = dict(self._bytes)
        self._quietly(
            lambda: self._store.record_attempt(
                self.job_id,
                self.attempt,
                kind=self.kind,
                outcome=outcome,
                cause=cause,
                blob_bytes=transferred,
            )
        )

    def _close(self, outcome: str) -> None:
        if self._open is None:
            return
        _name, step_id, started = self._open
        self._open = None
        if step_id is not None:
            seconds = time.monotonic() - started
            self._quietly(lambda: self._store.finish_step(step_id, seconds, outcome))

    def _quietly(self, write: Callable[[], _T]) -> _T | None:
        try:
            return write()
        except Exception as exc:
            logger.warning("could not record step timing for job %s: %s", self.job_id, exc)
            return None


def current() -> StepRecorder | None:
    """The recorder of the job running in this thread, if any."""
    return _current.get()


def fail_open_step() -> None:
    """The job running in this thread failed in its open step; a no-op outside a job."""
    recorder = _current.get()
    if recorder is not None:
        recorder.fail_open()


def enter_step(name: str) -> None:
    """The job running in this thread enters step `name`; a no-op outside a job."""
    recorder = _current.get()
    if recorder is not None:
        recorder.enter(name)
