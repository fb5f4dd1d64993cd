"""Step timings and attempt records, read back per job and as `/metrics` figures."""

from __future__ import annotations

from mlflow_dock.jobs.steps import (
    ATTEMPT_FAILED,
    ATTEMPT_RETRY,
    STEP_FAILED,
    STEP_OK,
    STEP_RUNNING,
)


def test_steps_come_back_per_job_in_the_order_they_started(store):
    job, _ = store.request_build("m", "1")
    other, _ = store.request_build("m", "2")
    first = store.start_step(job.id, 1, "resolve")
    store.finish_step(first, 1.5, STEP_OK)
    store.start_step(job.id, 1, "push")
    store.start_step(other.id, 1, "resolve")
    found = store.steps_for([job.id, "unknown"])
    assert set(found) == {job.id, "unknown"} and found["unknown"] == []
    assert [(s.name, s.seconds, s.outcome) for s in found[job.id]] == [
        ("resolve", 1.5, STEP_OK),
        ("push", None, STEP_RUNNING),
    ]
    assert store.steps_for([]) == {}


def test_an_attempt_closes_the_steps_it_left_open_and_counts_in_the_figures(store):
    job, _ = store.request_build("m", "1")
    store.start_step(job.id, 1, "smoke")
    store.record_attempt(
        job.id,
        1,
        kind="build",
        outcome=ATTEMPT_RETRY,
        cause="smoke",
        blob_bytes={"uploaded": 10, "present": 3},
    )
    store.record_attempt(
        job.id, 2, kind="build", outcome=ATTEMPT_FAILED, cause="push", blob_bytes={}
    )
    (step,) = store.steps_for([job.id])[job.id]
    assert step.outcome == STEP_FAILED
    figures = store.figures(bucket_bounds=[1.0])
    assert figures.attempts == {("build", ATTEMPT_RETRY): 1, ("build", ATTEMPT_FAILED): 1}
    assert figures.retries == {"smoke": 1} and figures.smoke_failures == 1
    assert figures.blob_bytes == {"uploaded": 10, "mounted": 0, "present": 3}
    assert figures.queue_depth == {"build": 1, "alias": 0}
    assert figures.jobs == {("build", "queued"): 1}
