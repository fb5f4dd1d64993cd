"""Running stored jobs: `execute_job` for one claimed job, `WorkerPool` for the embedded pool.

`execute_job` is the unit a distributed task engine would call on a remote worker; the pool is
only one way to feed it (threads polling the store, woken when an event is accepted).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from mlflow_dock.errors import JobError, is_retryable
from mlflow_dock.jobs.logs import BuildLogs
from mlflow_dock.jobs.model import Job, JobKind, Runner, retry_delay
from mlflow_dock.jobs.store import JobStore

logger = logging.getLogger(__name__)


def execute_job(
    job: Job,
    *,
    store: JobStore,
    runner: Runner,
    logs: BuildLogs,
    max_attempts: int,
    backoff_seconds: float,
    on_change: Callable[[Job], None] = lambda _job: None,
) -> Job:
    """Run a job the caller has claimed and record how it ended. Never raises for job failures.

    `on_change` sees the job as claimed and as it ended (e.g. to write tags back to MLflow).
    """

    def log(line: str) -> None:
        logs.append(job.id, line)

    on_change(job)
    ended = _run_and_record(job, log, store, runner, logs, max_attempts, backoff_seconds)
    on_change(ended)
    return ended


def _run_and_record(
    job: Job,
    log: Callable[[str], None],
    store: JobStore,
    runner: Runner,
    logs: BuildLogs,
    max_attempts: int,
    backoff_seconds: float,
) -> Job:
    log(
        f"attempt {job.attempts} of {max_attempts}: {job.kind} job for '{job.model_name}' "
        f"version {job.version}" + (f" alias '{job.alias}'" if job.alias else "")
    )
    try:
        outcome = runner.run(job, log)
    except Exception as exc:
        reason = logs.redact(_one_line(exc))
        if not isinstance(exc, JobError):
            logger.exception("job %s crashed", job.id)
            reason = f"internal error: {reason}"
        if is_retryable(exc) and job.attempts < max_attempts:
            delay = retry_delay(job.attempts, backoff_seconds)
            log(f"transient failure, retrying in {delay:.0f} s: {reason}")
            logger.warning("job %s will retry in %.0f s: %s", job.id, delay, reason)
            return store.retry_later(job.id, reason, delay)
        log(f"FAILED: {reason}")
        logger.error("job %s failed: %s", job.id, reason)
        return store.fail(job.id, reason, permanent=not is_retryable(exc))
    finished = store.succeed(
        job.id, image=outcome.image, digest=outcome.digest, tags=outcome.tags, note=outcome.note
    )
    if outcome.note:
        log(f"note: {outcome.note}")
    log(f"succeeded in {finished.duration_seconds or 0:.1f} s: {outcome.image}@{outcome.digest}")
    logger.info("job %s succeeded: %s@%s", job.id, outcome.image, outcome.digest)
    return finished


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:1000]


class WorkerPool:
    """Threads that claim queued jobs from the store, at most `concurrency` at a time."""

    def __init__(
        self,
        *,
        store: JobStore,
        runner: Runner,
        logs: BuildLogs,
        concurrency: int,
        max_attempts: int,
        backoff_seconds: float,
        poll_seconds: float = 2.0,
        on_change: Callable[[Job], None] = lambda _job: None,
    ) -> None:
        self._on_change = on_change
        self._store = store
        self._runner = runner
        self._logs = logs
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff = backoff_seconds
        self._poll = poll_seconds
        self._wake = threading.Condition()
        self._pending_wakeups = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, *, recover: bool = True) -> None:
        """Start the threads; `recover` requeues jobs a crashed process left running.

        Only the process that owns the store may recover: a second process (e.g. a foreground
        backfill beside a running service) would steal the service's running jobs.
        """
        requeued = self._store.requeue_interrupted() if recover else []
        for job in requeued:
            logger.warning("job %s was interrupted by a restart; queued again", job.id)
            self._logs.append(job.id, "interrupted by a service restart; queued again")
        for index in range(self._concurrency):
            thread = threading.Thread(
                target=self._loop, name=f"mlflow-dock-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        with self._wake:
            self._pending_wakeups += 1
            self._wake.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.notify()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._store.claim_next()
            except Exception:
                logger.exception("claiming a job failed; retrying")
                job = None
            if job is None:
                self._sleep()
                continue
            execute_job(
                job,
                store=self._store,
                runner=self._runner,
                logs=self._logs,
                max_attempts=self._max_attempts,
                backoff_seconds=self._backoff,
                on_change=self._on_change,
            )
            if job.kind is JobKind.BUILD:
                # A finished build may unblock alias jobs waiting on it.
                self.notify()

    def _sleep(self) -> None:
        timeout = self._poll
        wakeup = self._store.next_wakeup()
        if wakeup is not None:
            timeout = max(0.05, min(timeout, (wakeup - datetime.now(UTC)).total_seconds()))
        with self._wake:
            if self._pending_wakeups == 0:
                self._wake.wait(timeout)
            self._pending_wakeups = max(0, self._pending_wakeups - 1)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)
