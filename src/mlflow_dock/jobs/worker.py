"""Running stored jobs: `execute_job` for one claimed job, `WorkerPool` for the embedded pool.

`execute_job` is the unit every executor calls: the embedded pool's threads and the celery
task alike. It holds the job's lease with a heartbeat while the runner works, and records the
outcome only while the lease is still its own.

Nothing here may end a worker: a failing store (PostgreSQL restarting, SQLite locked) is logged
and waited out. A job whose outcome could not be recorded keeps its lease until it expires and
is then reclaimed and run again, which is safe because publishing is idempotent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, ExitStack, nullcontext
from datetime import UTC, datetime
from typing import ClassVar, Protocol

from mlflow_dock.errors import JobError, LeaseLostError, is_retryable
from mlflow_dock.jobs.logs import JobLogs
from mlflow_dock.jobs.model import (
    LANE_KINDS,
    Job,
    JobKind,
    JobState,
    Lane,
    Runner,
    TagWrites,
    retry_delay,
)
from mlflow_dock.jobs.steps import (
    ATTEMPT_FAILED,
    ATTEMPT_RETRY,
    ATTEMPT_SUCCEEDED,
    CAUSE_INTERRUPTED,
    StepLog,
    StepRecorder,
    fail_open_step,
)
from mlflow_dock.observe.context import log_context
from mlflow_dock.store.database import store_unavailable

logger = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 30.0
# How long a worker keeps trying to record an outcome while the store is unreachable; after
# that the lease expires and another worker runs the job again (idempotently).
RECORD_PATIENCE_SECONDS = 120.0
# A pool polling at least this often does not also ask when the next backoff ends.
_SHORT_POLL_SECONDS = 0.5


class LeaseStore(Protocol):
    def renew_lease(self, job_id: str, *, owner: str, lease_seconds: float) -> bool: ...


class OutcomeStore(LeaseStore, StepLog, Protocol):
    """What running one claimed job needs: its lease, its steps, and recording its outcome."""

    def first_delivery(self, job_id: str) -> str | None: ...

    def succeed(
        self,
        job_id: str,
        *,
        image: str,
        digest: str,
        tags: tuple[str, ...] = ...,
        note: str | None = ...,
        owner: str | None = ...,
        sbom: str | None = ...,
        signature: str | None = ...,
        provenance: str | None = ...,
        modelcar: str | None = ...,
        v2_model: str | None = ...,
        tag_writes: TagWrites | None = ...,
    ) -> Job: ...

    def fail(
        self,
        job_id: str,
        reason: str,
        *,
        permanent: bool = ...,
        owner: str | None = ...,
        tag_writes: TagWrites | None = ...,
    ) -> Job: ...

    def retry_later(
        self,
        job_id: str,
        reason: str,
        delay_seconds: float,
        *,
        waiting: bool = ...,
        owner: str | None = ...,
        tag_writes: TagWrites | None = ...,
    ) -> Job: ...


class WorkerStore(OutcomeStore, Protocol):
    """What the embedded pool needs besides: claims, reclaiming, and when to wake up."""

    def claim_next(
        self, *, owner: str, lease_seconds: float, kinds: Collection[JobKind] | None = ...
    ) -> Job | None: ...

    def reclaim_expired(self, *, kinds: Collection[JobKind] | None = ...) -> list[Job]: ...

    def next_wakeup(self, *, kinds: Collection[JobKind] | None = ...) -> datetime | None: ...


def worker_identity() -> str:
    """A lease owner name that is unique per process and says where the process runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseHeartbeat:
    """Renews a job's lease every third of its length until stopped, in a daemon thread."""

    def __init__(self, store: LeaseStore, job_id: str, owner: str, lease_seconds: float) -> None:
        self._store = store
        self._job_id = job_id
        self._owner = owner
        self._lease = lease_seconds
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                held = self._store.renew_lease(
                    self._job_id, owner=self._owner, lease_seconds=self._lease
                )
            except Exception as exc:
                # The store may be back before the lease runs out; keep trying.
                logger.warning("renewing the lease of job %s failed: %s", self._job_id, exc)
                continue
            if not held:
                logger.warning("job %s: lease lost; another worker has it now", self._job_id)
                self.lost.set()
                return


def execute_job(
    job: Job,
    *,
    store: OutcomeStore,
    runner: Runner,
    logs: JobLogs,
    max_attempts: int,
    backoff_seconds: float,
    max_backoff_seconds: float = 300.0,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    on_change: Callable[[Job], None] = lambda _job: None,
    tag_writes: TagWrites | None = None,
) -> Job | None:
    """Run a job the caller has claimed (under `job.owner`'s lease) and record how it ended.

    Never raises. Returns the recorded job, or None when the outcome was not recorded (the
    lease was lost, or the store stayed unreachable); the lease then expires and the job is
    reclaimed. `tag_writes` derives the outcome's MLflow tags, stored in the outcome's own
    transaction (durable write-back); `on_change` still hears of every change.
    """

    def log(line: str) -> None:
        try:
            logs.append(job.id, line)
        except Exception:
            logger.exception("writing the log of job %s failed", job.id)

    observed = _Observation(job, store)
    _notify(on_change, job)
    ended: Job | None = None
    # A job run without an owner holds no lease, so there is nothing to renew.
    heartbeat: AbstractContextManager[object] = (
        LeaseHeartbeat(store, job.id, job.owner, lease_seconds)
        if job.owner is not None
        else nullcontext()
    )
    try:
        with heartbeat:
            ended = _run_and_record(
                job,
                log,
                store,
                runner,
                logs,
                max_attempts,
                backoff_seconds,
                max_backoff_seconds,
                tag_writes,
            )
    except LeaseLostError as exc:
        log(f"result dropped: {exc}")
        logger.warning("job %s: %s", job.id, exc)
    except Exception:
        logger.exception("recording the outcome of job %s failed; its lease will expire", job.id)
    if ended is not None:
        _notify(on_change, ended)
    observed.end(ended)
    return ended


class _Observation:
    """While a job runs in this thread: its log context and its step recorder are current.

    Started and ended around `execute_job`'s body (which never raises), so every log line of
    the job carries its ids and the runner's steps land in the store under this attempt.
    """

    _OUTCOMES: ClassVar[dict[JobState, str]] = {
        JobState.SUCCEEDED: ATTEMPT_SUCCEEDED,
        JobState.QUEUED: ATTEMPT_RETRY,
        JobState.FAILED: ATTEMPT_FAILED,
    }

    def __init__(self, job: Job, store: OutcomeStore) -> None:
        self._stack = ExitStack()
        try:
            delivery_id = store.first_delivery(job.id)
        except Exception:
            delivery_id = None  # only for log context; never worth stopping the job
        self._stack.enter_context(
            log_context(
                job_id=job.id,
                delivery_id=delivery_id,
                model=job.model_name,
                version=job.version or None,
                alias=job.alias,
            )
        )
        self.steps = StepRecorder(store, job_id=job.id, attempt=job.attempts, kind=job.kind.value)
        self._stack.enter_context(self.steps.active())

    def end(self, ended: Job | None) -> None:
        # None: the outcome was not recorded (lease lost); the attempt counts as a retry.
        outcome = self._OUTCOMES.get(ended.state, ATTEMPT_RETRY) if ended else ATTEMPT_RETRY
        self.steps.finish(outcome)
        self._stack.close()


def _notify(on_change: Callable[[Job], None], job: Job) -> None:
    try:
        on_change(job)
    except Exception:
        logger.exception("job %s: change hook failed", job.id)


def _run_and_record(
    job: Job,
    log: Callable[[str], None],
    store: OutcomeStore,
    runner: Runner,
    logs: JobLogs,
    max_attempts: int,
    backoff_seconds: float,
    max_backoff_seconds: float,
    tag_writes: TagWrites | None = None,
) -> Job:
    log(
        f"attempt {job.attempts} of {max_attempts}: {job.kind} job for '{job.model_name}' "
        f"version {job.version}" + (f" alias '{job.alias}'" if job.alias else "")
    )
    owner = job.owner
    try:
        outcome = runner.run(job, log)
    except Exception as exc:
        fail_open_step()
        reason = logs.redact(_one_line(exc))
        # The runner reads the store too (earlier images, alias targets): a database that is
        # restarting is a transient fault like any other, not a crash.
        store_down = store_unavailable(exc)
        if not isinstance(exc, JobError) and not store_down:
            logger.exception("job %s crashed", job.id)
            reason = f"internal error: {reason}"
        if is_retryable(exc) or store_down:
            delay = retry_delay(job.attempts, backoff_seconds, max_backoff_seconds)
            # Retries exhausted for a transient cause: keep waiting (capped backoff) rather
            # than fail for something that goes away, e.g. a registry down for an hour.
            waiting = job.attempts >= max_attempts
            verb = "still failing, waiting" if waiting else "transient failure, retrying in"
            log(f"{verb} {delay:.0f} s: {reason}")
            logger.warning("job %s will retry in %.0f s: %s", job.id, delay, reason)
            return _record(
                lambda: store.retry_later(
                    job.id, reason, delay, waiting=waiting, owner=owner, tag_writes=tag_writes
                )
            )
        log(f"FAILED: {reason}")
        logger.error("job %s failed: %s", job.id, reason)
        return _record(
            lambda: store.fail(job.id, reason, permanent=True, owner=owner, tag_writes=tag_writes)
        )
    finished = _record(
        lambda: store.succeed(
            job.id,
            image=outcome.image,
            digest=outcome.digest,
            tags=outcome.tags,
            note=outcome.note,
            owner=owner,
            sbom=outcome.sbom,
            signature=outcome.signature,
            provenance=outcome.provenance,
            modelcar=outcome.modelcar,
            v2_model=outcome.v2_model,
            tag_writes=tag_writes,
        )
    )
    if outcome.note:
        log(f"note: {outcome.note}")
    log(f"succeeded in {finished.duration_seconds or 0:.1f} s: {outcome.image}@{outcome.digest}")
    logger.info("job %s succeeded: %s@%s", job.id, outcome.image, outcome.digest)
    return finished


def _record(write: Callable[[], Job], patience: float = RECORD_PATIENCE_SECONDS) -> Job:
    """Write an outcome, waiting out a store outage; LeaseLostError passes through at once."""
    deadline = time.monotonic() + patience
    delay = 0.5
    while True:
        try:
            return write()
        except LeaseLostError:
            raise
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("recording a job outcome failed, retrying in %.1f s: %s", delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:1000]


class WorkerPool:
    """Threads that claim queued jobs of their `kinds` from the store, `concurrency` at a time.

    Every pool also reclaims jobs of its kinds whose lease expired, whoever held them: a killed
    process (this one before a restart, another replica, a `backfill --wait`) leaves its jobs
    to whichever worker looks next, and only once their leases have run out.
    """

    def __init__(
        self,
        *,
        store: WorkerStore,
        runner: Runner,
        logs: JobLogs,
        concurrency: int,
        max_attempts: int,
        backoff_seconds: float,
        max_backoff_seconds: float = 300.0,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        poll_seconds: float = 2.0,
        on_change: Callable[[Job], None] = lambda _job: None,
        tag_writes: TagWrites | None = None,
        kinds: Collection[JobKind] | None = None,
        name: str = "worker",
        on_finished: Callable[[Job], None] = lambda _job: None,
    ) -> None:
        self._on_change = on_change
        self._tag_writes = tag_writes
        self._store = store
        self._runner = runner
        self._logs = logs
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._lease = lease_seconds
        self._poll = min(poll_seconds, lease_seconds / 2)
        # None: every kind (one pool for every job, without lanes).
        self.kinds = frozenset(JobKind) if kinds is None else frozenset(kinds)
        self._claim_kinds = None if self.kinds == frozenset(JobKind) else self.kinds
        self.name = name
        # Told of every job this pool ran to its end, e.g. to wake the lane of its dependents.
        self._on_finished = on_finished
        self.owner = worker_identity()
        self._wake = threading.Condition()
        # Set by `notify` and cleared by the thread it wakes. A flag, not a count: a woken
        # thread claims until nothing is runnable, so a burst of deliveries (every webhook
        # notifies) costs one more claim, not one claim each.
        self._woken = False
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reclaim_guard = threading.Lock()
        self._next_reclaim = 0.0

    def start(self) -> None:
        for index in range(self._concurrency):
            thread = threading.Thread(
                target=self._loop, name=f"mlflow-dock-{self.name}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.notify()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._reclaim_expired()
                job = self._store.claim_next(
                    owner=self.owner, lease_seconds=self._lease, kinds=self._claim_kinds
                )
            except Exception as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                logger.warning("claiming a job failed, retrying in %.0f s: %s", delay, exc)
                self._stopping.wait(delay)
                continue
            failures = 0
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
                max_backoff_seconds=self._max_backoff,
                lease_seconds=self._lease,
                on_change=self._on_change,
                tag_writes=self._tag_writes,
            )
            if job.kind is JobKind.BUILD and self.kinds & LANE_KINDS[Lane.ALIAS]:
                # A finished build may unblock alias jobs this pool runs too.
                self.notify()
            _notify(self._on_finished, job)

    def _reclaim_expired(self) -> None:
        with self._reclaim_guard:
            now = time.monotonic()
            if now < self._next_reclaim:
                return
            self._next_reclaim = now + self._lease / 2
        for job in self._store.reclaim_expired(kinds=self._claim_kinds):
            logger.warning("job %s: %s", job.id, job.error)
            try:
                self._logs.append(job.id, f"{job.error}")
            except Exception:
                logger.exception("writing the log of job %s failed", job.id)
            # The attempt whose worker died counts as a retry caused by the interruption.
            StepRecorder(
                self._store, job_id=job.id, attempt=job.attempts, kind=job.kind.value
            ).finish(ATTEMPT_RETRY, cause=CAUSE_INTERRUPTED)

    def _sleep(self) -> None:
        timeout = self._poll
        wakeup = None
        # A backoff that ends within a short poll is found by the next poll anyway.
        if timeout > _SHORT_POLL_SECONDS:
            try:
                wakeup = self._store.next_wakeup(kinds=self._claim_kinds)
            except Exception as exc:
                logger.warning("reading the next wakeup failed: %s", exc)
        if wakeup is not None:
            timeout = max(0.05, min(timeout, (wakeup - datetime.now(UTC)).total_seconds()))
        with self._wake:
            if not self._woken:
                self._wake.wait(timeout)
            self._woken = False

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)
