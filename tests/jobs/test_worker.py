"""Workers survive their store and runner failing, hold leases while running, drop stale results."""

from __future__ import annotations

import threading
import time

from sqlalchemy.exc import OperationalError

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.jobs.logs import BuildLogs
from mlflow_dock.jobs.model import Job, JobOutcome, JobState
from mlflow_dock.jobs.steps import STEP_FAILED, enter_step
from mlflow_dock.jobs.worker import WorkerPool, execute_job
from mlflow_dock.store.facade import JobStore

DIGEST = "sha256:" + "e" * 64


class Runner:
    def __init__(self, fail_with: Exception | None = None, seconds: float = 0.0) -> None:
        self.fail_with = fail_with
        self.seconds = seconds
        self.calls = 0

    def run(self, job: Job, log) -> JobOutcome:
        self.calls += 1
        time.sleep(self.seconds)
        if self.fail_with is not None:
            raise self.fail_with
        return JobOutcome(image=f"r/m:{job.version}", digest=DIGEST)


class FlakyStore:
    """A store whose every call fails while `down` is set, as PostgreSQL restarting does."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.down = threading.Event()

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down.is_set():
                raise OperationalError("select 1", {}, ConnectionRefusedError("store down"))
            return attr(*args, **kwargs)

        return call


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_store_outage_does_not_end_the_worker(store, tmp_path):
    flaky = FlakyStore(store)
    flaky.down.set()
    pool = WorkerPool(
        store=flaky,  # type: ignore[arg-type]
        runner=Runner(),
        logs=BuildLogs(tmp_path / "logs"),
        concurrency=1,
        max_attempts=3,
        backoff_seconds=0.1,
        lease_seconds=2,
        poll_seconds=0.1,
    )
    pool.start()
    try:
        time.sleep(1.5)  # claims fail meanwhile
        assert pool.running
        job, _ = store.request_build("m", "1")
        flaky.down.clear()
        pool.notify()
        wait_for(lambda: store.get(job.id).state is JobState.SUCCEEDED)
        assert pool.running
    finally:
        pool.stop()


def test_heartbeat_keeps_a_long_job_and_only_the_owner_records(store, tmp_path):
    store.request_build("m", "1")
    claimed = store.claim_next(owner="me", lease_seconds=1)
    ended = execute_job(
        claimed,
        store=store,
        runner=Runner(seconds=2.5),  # longer than the lease: the heartbeat must renew it
        logs=BuildLogs(tmp_path / "logs"),
        max_attempts=3,
        backoff_seconds=1,
        lease_seconds=1,
    )
    assert ended is not None and ended.state is JobState.SUCCEEDED


def test_a_result_after_a_lost_lease_is_dropped(store, tmp_path):
    job, _ = store.request_build("m", "1")
    claimed = store.claim_next(owner="old", lease_seconds=1)
    # Another worker took it over while "old" was cut off from the store.
    store.renew_lease(job.id, owner="old", lease_seconds=0.01)
    time.sleep(0.05)
    store.reclaim_expired()
    store.claim_next(owner="new", lease_seconds=30)
    ended = execute_job(
        claimed,
        store=store,
        runner=Runner(),
        logs=BuildLogs(tmp_path / "logs"),
        max_attempts=3,
        backoff_seconds=1,
        lease_seconds=30,
    )
    assert ended is None
    now = store.get(job.id)
    assert now.state is JobState.RUNNING and now.owner == "new"


def test_transient_failures_wait_instead_of_failing(store, tmp_path):
    store.request_build("m", "1")
    runner = Runner(fail_with=RetryableError("registry 503"))
    logs = BuildLogs(tmp_path / "logs")
    for _ in range(3):
        claimed = store.claim_next(owner="w", lease_seconds=30)
        ended = execute_job(
            claimed,
            store=store,
            runner=runner,
            logs=logs,
            max_attempts=2,
            backoff_seconds=0.01,
            max_backoff_seconds=0.05,
            lease_seconds=30,
        )
        time.sleep(0.06)
    assert ended is not None and ended.state is JobState.QUEUED
    assert ended.attempts == 3 and ended.error == "waiting: registry 503"


def test_permanent_failures_fail(store, tmp_path):
    store.request_build("m", "1")
    claimed = store.claim_next(owner="w", lease_seconds=30)
    ended = execute_job(
        claimed,
        store=store,
        runner=Runner(fail_with=PermanentError("model not found")),
        logs=BuildLogs(tmp_path / "logs"),
        max_attempts=5,
        backoff_seconds=1,
        lease_seconds=30,
    )
    assert ended is not None and ended.state is JobState.FAILED and ended.permanent


def test_a_failed_job_is_stored_with_its_failed_step(store, tmp_path):
    # A board polling the store must never see the job failed while its step still runs.
    class Resolving(Runner):
        def run(self, job: Job, log) -> JobOutcome:
            enter_step("resolve")
            raise PermanentError("model not found")

    class Watching(FlakyStore):
        def fail(self, job_id: str, *args, **kwargs):
            seen.extend(s.outcome for s in store.steps_for([job_id])[job_id])
            return self._store.fail(job_id, *args, **kwargs)

    seen: list[str] = []
    store.request_build("m", "1")
    claimed = store.claim_next(owner="w", lease_seconds=30)
    ended = execute_job(
        claimed,
        store=Watching(store),  # type: ignore[arg-type]
        runner=Resolving(),
        logs=BuildLogs(tmp_path / "logs"),
        max_attempts=5,
        backoff_seconds=1,
        lease_seconds=30,
    )
    assert ended is not None and ended.state is JobState.FAILED
    assert seen == [STEP_FAILED]


def test_outcome_tags_are_stored_with_the_outcome(store, tmp_path):
    store.request_build("m", "1")
    claimed = store.claim_next(owner="w", lease_seconds=30)
    seen: list[JobState] = []
    ended = execute_job(
        claimed,
        store=store,
        runner=Runner(),
        logs=BuildLogs(tmp_path / "logs"),
        max_attempts=3,
        backoff_seconds=1,
        lease_seconds=30,
        on_change=lambda job: seen.append(job.state),
        tag_writes=lambda job: [(job.model_name, job.version, {"status": job.state.value})],
    )
    assert ended is not None and ended.state is JobState.SUCCEEDED
    # Already pending when the change hook runs: no hook is needed for the tag to survive.
    assert [(w.tag, w.value) for w in store.pending_tag_writes()] == [("status", "succeeded")]
    assert seen == [JobState.RUNNING, JobState.SUCCEEDED]
