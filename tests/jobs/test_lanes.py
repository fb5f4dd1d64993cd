"""Lanes: alias jobs never wait behind builds, and a finished build wakes the alias lane."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from mlflow_dock.jobs.lanes import (
    ALIAS_POLL_SECONDS,
    LanePlan,
    Lanes,
    plan_lanes,
)
from mlflow_dock.jobs.logs import BuildLogs
from mlflow_dock.jobs.model import LANE_KINDS, Job, JobKind, JobOutcome, JobState, Lane
from mlflow_dock.jobs.worker import WorkerPool
from mlflow_dock.store.facade import JobStore

DIGEST = "sha256:" + "d" * 64
LEASE = 300.0  # long: nothing here may depend on a lease running out


class GatedRunner:
    """Builds wait for `release` (a long build); alias jobs only move a tag and return."""

    def __init__(self, build_seconds: float | None = None) -> None:
        self.release = threading.Event()
        self.build_seconds = build_seconds

    def run(self, job: Job, log) -> JobOutcome:
        if job.kind is JobKind.BUILD:
            if self.build_seconds is not None:
                time.sleep(self.build_seconds)
            else:
                assert self.release.wait(30), "test never released the build"
        return JobOutcome(image=f"r/m:{job.alias or job.version}", digest=DIGEST)


def lanes_for(store: JobStore, runner: GatedRunner, tmp_path, plans) -> Lanes:
    def pool(plan: LanePlan, on_finished: Callable[[Job], None]) -> WorkerPool:
        return WorkerPool(
            store=store,
            runner=runner,
            logs=BuildLogs(tmp_path / "logs"),
            concurrency=plan.concurrency,
            max_attempts=3,
            backoff_seconds=1,
            lease_seconds=LEASE,
            poll_seconds=plan.poll_seconds,
            kinds=plan.kinds,
            name=plan.lane.value,
            on_finished=on_finished,
        )

    return Lanes(plans, pool)


def wait_for(predicate, timeout: float = 15.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - started


def built(store: JobStore, version: str) -> Job:
    job, _ = store.request_build("m", version)
    store.claim(job.id, owner="earlier", lease_seconds=LEASE)
    return store.succeed(job.id, image=f"r/m:{version}", digest=DIGEST, owner="earlier")


def test_plans_by_lane_size():
    build, alias = plan_lanes(build_concurrency=2, alias_concurrency=1)
    assert (build.lane, build.kinds, build.concurrency) == (Lane.BUILD, LANE_KINDS[Lane.BUILD], 2)
    assert (alias.lane, alias.kinds, alias.concurrency) == (Lane.ALIAS, LANE_KINDS[Lane.ALIAS], 1)
    # The alias lane polls often: a build another process finished is noticed that soon.
    assert alias.poll_seconds == ALIAS_POLL_SECONDS < 0.5 < build.poll_seconds
    # An API replica (no builds here) still moves tags.
    assert [p.lane for p in plan_lanes(build_concurrency=0, alias_concurrency=1)] == [Lane.ALIAS]
    # No alias lane: the build pool runs every kind, as before lanes.
    (only,) = plan_lanes(build_concurrency=1, alias_concurrency=0)
    assert only.lane is Lane.BUILD and only.kinds == frozenset(JobKind)
    assert plan_lanes(build_concurrency=0, alias_concurrency=0) == ()


def test_an_alias_is_tagged_while_builds_run_and_wait(store, tmp_path):
    built(store, "1")
    runner = GatedRunner()
    lanes = lanes_for(store, runner, tmp_path, plan_lanes(build_concurrency=1, alias_concurrency=1))
    running, _ = store.request_build("m", "2")
    waiting, _ = store.request_build("m", "3")
    lanes.start()
    try:
        lanes.notify(JobKind.BUILD)
        wait_for(lambda: store.get(running.id).state is JobState.RUNNING)
        alias, _ = store.request_alias("m", "1", "champion")
        lanes.notify(JobKind.ALIAS)
        wait_for(lambda: store.get(alias.id).state is JobState.SUCCEEDED)
        # Tagged while the only build slot is still busy and another build still waits.
        assert store.get(running.id).state is JobState.RUNNING
        assert store.get(waiting.id).state is JobState.QUEUED
    finally:
        runner.release.set()
        lanes.stop()


def test_a_finished_build_wakes_the_alias_lane_at_once(store, tmp_path):
    runner = GatedRunner(build_seconds=0.3)
    # Polls far longer than the test may take: only the wake-up can run the alias in time.
    plans = [
        replace(p, poll_seconds=LEASE) for p in plan_lanes(build_concurrency=1, alias_concurrency=1)
    ]
    lanes = lanes_for(store, runner, tmp_path, plans)
    lanes.start()
    try:
        time.sleep(0.2)  # both lanes have polled once and sleep now
        build, _ = store.request_build("m", "1")
        alias, _ = store.request_alias("m", "1", "champion")
        lanes.notify(JobKind.BUILD)
        lanes.notify(JobKind.ALIAS)  # blocked by its build: the alias lane sleeps again
        wait_for(lambda: store.get(alias.id).state is JobState.SUCCEEDED, timeout=10)
        done = store.get(build.id)
        assert done.state is JobState.SUCCEEDED
        assert store.get(alias.id).started_at >= done.finished_at
    finally:
        lanes.stop()


def test_the_alias_lane_finds_a_build_finished_by_another_process(store, tmp_path):
    """No build lane here (an API replica, or Celery): the alias lane's poll notices."""
    lanes = lanes_for(
        store, GatedRunner(), tmp_path, plan_lanes(build_concurrency=0, alias_concurrency=1)
    )
    build, _ = store.request_build("m", "1")
    alias, _ = store.request_alias("m", "1", "champion")
    lanes.start()
    try:
        store.claim(build.id, owner="another-process", lease_seconds=LEASE)
        time.sleep(0.3)
        assert store.get(alias.id).state is JobState.QUEUED
        store.succeed(build.id, image="r/m:1", digest=DIGEST, owner="another-process")
        wait_for(lambda: store.get(alias.id).state is JobState.SUCCEEDED, timeout=10)
        assert lanes.kinds == LANE_KINDS[Lane.ALIAS] and not lanes.runs(JobKind.BUILD)
    finally:
        lanes.stop()
