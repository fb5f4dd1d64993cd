"""Step timings recorded into a real store (SQLite and PostgreSQL), as the worker and runner
produce them."""

from __future__ import annotations

from mlflow_dock.jobs.steps import (
    ATTEMPT_FAILED,
    ATTEMPT_RETRY,
    ATTEMPT_SUCCEEDED,
    CAUSE_INTERRUPTED,
    STEP_FAILED,
    STEP_OK,
    STEP_RUNNING,
    StepRecorder,
    current,
    enter_step,
    fail_open_step,
)


def test_entering_a_step_ends_the_previous_one(store):
    job, _ = store.request_build("m", "1")
    recorder = StepRecorder(store, job_id=job.id, attempt=1, kind="build")
    with recorder.active():
        assert current() is recorder
        enter_step("resolve")
        enter_step("build")
        running = store.steps_for([job.id])[job.id]
        assert [(s.name, s.outcome) for s in running] == [
            ("resolve", STEP_OK),
            ("build", STEP_RUNNING),
        ]
        assert running[0].seconds is not None and running[1].seconds is None
    assert current() is None
    recorder.finish(ATTEMPT_SUCCEEDED)
    steps = store.steps_for([job.id])[job.id]
    assert [(s.name, s.outcome) for s in steps] == [("resolve", STEP_OK), ("build", STEP_OK)]


def test_the_step_open_at_a_failure_is_its_cause(store):
    job, _ = store.request_build("m", "1")
    recorder = StepRecorder(store, job_id=job.id, attempt=2, kind="build")
    recorder.enter("resolve")
    recorder.enter("smoke")
    recorder.finish(ATTEMPT_FAILED)
    assert recorder.failed_step == "smoke"
    steps = store.steps_for([job.id])[job.id]
    assert steps[-1].outcome == STEP_FAILED and steps[-1].attempt == 2
    assert store.figures(bucket_bounds=(1.0,)).smoke_failures == 1


def test_a_failed_step_is_stored_before_the_attempt_ends(store):
    # The worker stores the job's outcome between these two calls: a board that reads the
    # failed job then must find the step that failed, not one still running.
    job, _ = store.request_build("m", "1")
    recorder = StepRecorder(store, job_id=job.id, attempt=1, kind="build")
    with recorder.active():
        enter_step("resolve")
        fail_open_step()
    [step] = store.steps_for([job.id])[job.id]
    assert (step.name, step.outcome) == ("resolve", STEP_FAILED)
    recorder.finish(ATTEMPT_FAILED)
    assert recorder.failed_step == "resolve"
    assert [s.outcome for s in store.steps_for([job.id])[job.id]] == [STEP_FAILED]
    assert store.figures(bucket_bounds=(1.0,)).attempts == {("build", ATTEMPT_FAILED): 1}


def test_enter_step_outside_a_job_does_nothing():
    enter_step("resolve")  # e.g. `mlflow-dock build` in the foreground


def test_a_store_failure_never_fails_the_job(store):
    class Broken:
        def start_step(self, *_args):
            raise OSError("disk full")

        def finish_step(self, *_args):
            raise OSError("disk full")

        def record_attempt(self, *_args, **_kwargs):
            raise OSError("disk full")

    recorder = StepRecorder(Broken(), job_id="j", attempt=1, kind="build")
    recorder.enter("resolve")
    recorder.enter("push")
    recorder.finish(ATTEMPT_SUCCEEDED)


def test_an_interrupted_attempt_closes_its_open_step(store):
    job, _ = store.request_build("m", "1")
    dead = StepRecorder(store, job_id=job.id, attempt=1, kind="build")
    dead.enter("push")  # ...and the worker is killed here
    StepRecorder(store, job_id=job.id, attempt=1, kind="build").finish(
        ATTEMPT_RETRY, cause=CAUSE_INTERRUPTED
    )
    [step] = store.steps_for([job.id])[job.id]
    assert step.outcome == STEP_FAILED
    assert store.figures(bucket_bounds=(1.0,)).retries == {CAUSE_INTERRUPTED: 1}
