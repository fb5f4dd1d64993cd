"""The celery executor: `serve` accepts and enqueues, `mlflow-dock worker` processes build.

Alias and unalias jobs do not travel through the broker: every `serve` runs them on its own
alias lane (jobs/lanes.py), so they never wait for a worker busy with a build. The sweeper
sends messages only for the kinds of job no lane of its replica runs.

The job store stays the source of truth. A message carries nothing but a job id; the worker
claims that job in the store with a lease (`claim`, store/queue.py) and runs it with
`execute_job`, so a duplicated, replayed or stale message is harmless: a claim is exclusive,
and a job that is not runnable (finished, running elsewhere, waiting for its build) is left
alone.

Celery settings chosen on purpose (the README explains them to operators):
- `task_acks_late`: a message is acknowledged when the task returns, not when it is received,
  so a worker machine that dies mid-build leaves its message with the broker;
- `task_reject_on_worker_lost`: if the pool process running a task is killed (OOM, kill -9),
  the message is requeued rather than acknowledged as failed;
- `worker_prefetch_multiplier=1`: a worker reserves one message per free process, so queued
  builds go to idle workers instead of waiting behind a busy one.
None of these is relied on for correctness: the lease decides who runs a job, and the leader's
`Sweeper` re-sends messages for queued jobs the broker lost and requeues expired leases.

No Celery app exists at import time; `create_celery` builds one from arguments.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Protocol

from mlflow_dock.jobs.model import Job, JobKind

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

TASK_NAME = "mlflow_dock.run_job"
QUEUE = "mlflow-dock"


class DispatchStore(Protocol):
    """The dispatch outbox's marks (`store.dispatch.DispatchMarks`)."""

    def mark_enqueued(self, job_id: str, *, sent: bool = ...) -> None: ...


class SweepStore(DispatchStore, Protocol):
    """What the leader's sweeper reads and marks."""

    def reclaim_expired(self) -> list[Job]: ...

    def take_unsent(
        self,
        *,
        resend_after_seconds: float,
        limit: int = ...,
        kinds: Collection[JobKind] | None = ...,
    ) -> list[str]: ...


def create_celery(
    broker_url: str,
    *,
    run_job: Callable[[str], None] | None = None,
    concurrency: int = 1,
    visibility_timeout_seconds: float = 3600.0,
) -> Celery:
    """A Celery app for sending (`run_job` None) or for running jobs in `mlflow-dock worker`."""
    from celery import Celery

    app = Celery("mlflow_dock", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=concurrency,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Keep trying to reach the broker, at start and after it restarts.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Redis re-delivers a message nobody acknowledged after this long; with late acks that
        # must outlast a build, or a long build's message would be handed out again.
        broker_transport_options={"visibility_timeout": visibility_timeout_seconds},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if run_job is not None:

        @app.task(name=TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
        def run(job_id: str) -> None:
            run_job(job_id)

    return app


def send(app: Celery, job_id: str) -> None:
    """Publish one job id; raises if the broker cannot be reached after a few quick tries."""
    app.send_task(
        TASK_NAME,
        args=[job_id],
        queue=QUEUE,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )


class Dispatcher:
    """Sends job ids from a background thread, so a slow broker never delays a webhook's 202.

    A job is marked "message sent" before the send and unmarked if it fails, so the sweeper
    covers every message that did not make it.
    """

    def __init__(self, app: Celery, store: DispatchStore) -> None:
        self._app = app
        self._store = store
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="celery-dispatch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def _loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                self._store.mark_enqueued(job_id)
                send(self._app, job_id)
            except Exception as exc:
                logger.warning("enqueueing job %s failed; the sweeper will: %s", job_id, exc)
                try:
                    self._store.mark_enqueued(job_id, sent=False)
                except Exception:
                    logger.warning("unmarking job %s failed; it is re-sent later", job_id)


class Sweeper:
    """Leader-only: requeues expired leases and sends messages for queued jobs that lack one."""

    def __init__(
        self,
        app: Celery,
        store: SweepStore,
        *,
        interval_seconds: float,
        resend_after_seconds: float,
        is_leader: Callable[[], bool],
        job_log: Callable[[str, str], None] = lambda _job_id, _line: None,
        kinds: Collection[JobKind] | None = None,
    ) -> None:
        self._job_log = job_log
        # The kinds of job the broker carries (None: all); the rest run on replicas' lanes.
        self.kinds = kinds
        self._app = app
        self._store = store
        self._interval = interval_seconds
        self._resend = resend_after_seconds
        self._is_leader = is_leader
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="celery-sweeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sweep_once(self) -> int:
        """One pass; returns how many messages it sent."""
        for job in self._store.reclaim_expired():
            logger.warning("job %s: %s", job.id, job.error)
            try:
                self._job_log(job.id, job.error or "lease expired; queued again")
            except Exception:
                logger.exception("writing the log of job %s failed", job.id)
        sent = 0
        for job_id in self._store.take_unsent(resend_after_seconds=self._resend, kinds=self.kinds):
            try:
                send(self._app, job_id)
                sent += 1
            except Exception as exc:
                self._store.mark_enqueued(job_id, sent=False)
                logger.warning("broker unreachable, will re-send job %s: %s", job_id, exc)
                break
        return sent

    def _loop(self) -> None:
        while not self._stopping.wait(self._interval):
            if not self._is_leader():
                continue
            try:
                self.sweep_once()
            except Exception as exc:
                logger.warning("sweeping failed (store unreachable?): %s", exc)
