from __future__ import annotations

import threading
import time

import pytest

from mlflow_dock.errors import NotFoundError
from mlflow_dock.jobs.model import JobKind, JobState
from mlflow_dock.jobs.store import JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore.from_url(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def test_delivery_id_is_idempotent(store):
    job, created = store.request_build("m", "1", delivery_id="d1")
    again, created_again = store.request_build("m", "1", delivery_id="d1")
    assert created and not created_again
    assert again.id == job.id
    assert store.job_for_delivery("d1").id == job.id
    assert store.job_for_delivery("unknown") is None


def test_second_event_for_same_version_reuses_the_job(store):
    job, _ = store.request_build("m", "1", delivery_id="d1")
    other, created = store.request_build("m", "1", delivery_id="d2")
    assert other.id == job.id and not created
    assert len(store.list()) == 1


def test_failed_build_is_requeued_by_a_new_event(store):
    job, _ = store.request_build("m", "1")
    store.claim_next()
    store.fail(job.id, "boom")
    again, changed = store.request_build("m", "1", delivery_id="d9")
    assert changed and again.id == job.id and again.state is JobState.QUEUED
    assert again.error is None and again.attempts == 0


def test_claim_is_exclusive_across_threads(store):
    for v in range(1, 6):
        store.request_build("m", str(v))
    claimed: list[str] = []
    lock = threading.Lock()

    def worker():
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 5 == len(set(claimed))


def test_alias_waits_for_its_build(store):
    build, _ = store.request_build("m", "3")
    alias, _ = store.request_alias("m", "3", "champion", delivery_id="a1")
    assert alias.kind is JobKind.ALIAS and alias.depends_on == build.id
    assert store.claim_next().id == build.id
    assert store.claim_next() is None  # alias blocked while the build runs
    store.succeed(build.id, image="r/m:3", digest="sha256:" + "a" * 64)
    claimed = store.claim_next()
    assert claimed.id == alias.id and claimed.state is JobState.RUNNING


def test_alias_for_unbuilt_version_creates_the_build(store):
    alias, _ = store.request_alias("m", "7", "staging")
    build = store.build_for("m", "7")
    assert build is not None and alias.depends_on == build.id


def test_retry_later_delays_the_job(store):
    job, _ = store.request_build("m", "1")
    claimed = store.claim_next()
    assert claimed.attempts == 1
    store.retry_later(job.id, "registry 503", delay_seconds=0.3)
    assert store.claim_next() is None
    assert store.next_wakeup() is not None
    time.sleep(0.35)
    again = store.claim_next()
    assert again.id == job.id and again.attempts == 2


def test_requeue_interrupted_after_crash(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = JobStore.from_url(url)
    job, _ = first.request_build("m", "1")
    first.claim_next()
    first.close()
    second = JobStore.from_url(url)
    assert [j.id for j in second.requeue_interrupted()] == [job.id]
    assert second.get(job.id).state is JobState.QUEUED
    assert second.claim_next().id == job.id


def test_succeed_records_image_and_timings(store):
    job, _ = store.request_build("m", "1")
    store.claim_next()
    done = store.succeed(job.id, image="r/m:1", digest="sha256:" + "b" * 64, tags=("r/m:1",))
    assert done.state is JobState.SUCCEEDED and done.tags == ("r/m:1",)
    assert done.duration_seconds is not None and done.duration_seconds >= 0


def test_unknown_job_is_not_found(store):
    with pytest.raises(NotFoundError):
        store.get("nope")


def test_list_filters(store):
    store.request_build("a", "1")
    store.request_build("b", "1")
    assert [j.model_name for j in store.list(model_name="a")] == ["a"]
    assert len(store.list(state=JobState.QUEUED)) == 2
    assert store.count_by_state()[JobState.QUEUED] == 2


def test_unalias_remembers_the_alias_target_and_runs_after_earlier_alias_ops(store):
    build, _ = store.request_build("m", "1")
    store.claim_next()
    store.succeed(build.id, image="r/m:1", digest="sha256:" + "a" * 64)
    set_alias, _ = store.request_alias("m", "1", "champion")
    unset, _ = store.request_unalias("m", "champion", delivery_id="u1")
    assert unset.kind is JobKind.UNALIAS and unset.version == "1"
    assert store.claim_next().id == set_alias.id
    assert store.claim_next() is None  # the delete waits for the set to finish
    store.succeed(set_alias.id, image="r/m:champion", digest="sha256:" + "a" * 64)
    assert store.claim_next().id == unset.id


def test_fail_records_whether_retrying_could_help(store):
    job, _ = store.request_build("m", "1")
    store.claim_next()
    assert store.fail(job.id, "registry 503", permanent=False).permanent is False


def test_watch_since_is_set_once(store):
    assert store.watch_since() == store.watch_since()
