from __future__ import annotations

import time

import pytest

from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.mlflow.writeback import MlflowWriteBack, tag_writes_for, updates_for
from mlflow_dock.store.facade import JobStore
from support.databases import database

DIGEST = "sha256:" + "d" * 64


def job(**kw):
    base = dict(id="j", kind=JobKind.BUILD, model_name="m", version="3", state=JobState.RUNNING)
    return Job(**{**base, **kw})


def test_build_success_writes_image_with_digest_and_clears_error():
    (update,) = updates_for(job(state=JobState.SUCCEEDED, image="reg/m:3", digest=DIGEST))
    assert update.set_tags == {
        "mlflow_dock.status": "succeeded",
        "mlflow_dock.image": f"reg/m@{DIGEST}",
        "mlflow_dock.endpoints": "POST /invocations (MLflow scoring protocol)",
    }
    assert update.delete_tags == ("mlflow_dock.error",)


def test_build_success_writes_both_protocols_endpoints_and_the_modelcar():
    car = f"reg/m@sha256:{'e' * 64}"
    (update,) = updates_for(
        job(
            state=JobState.SUCCEEDED,
            image="reg/m:3",
            digest=DIGEST,
            modelcar=car,
            v2_model="Fraud model",
        )
    )
    assert update.set_tags["mlflow_dock.modelcar"] == car
    assert update.set_tags["mlflow_dock.endpoints"] == (
        "POST /invocations (MLflow scoring protocol); "
        "POST /v2/models/Fraud%20model/versions/3/infer (Open Inference Protocol, V2)"
    )


def test_build_success_writes_sbom_signature_and_provenance_references():
    sbom, sig, att = (f"reg/m@sha256:{c * 64}" for c in "abc")
    (update,) = updates_for(
        job(
            state=JobState.SUCCEEDED,
            image="reg/m:3",
            digest=DIGEST,
            sbom=sbom,
            signature=sig,
            provenance=att,
        )
    )
    assert update.set_tags["mlflow_dock.sbom"] == sbom
    assert update.set_tags["mlflow_dock.signature"] == sig
    assert update.set_tags["mlflow_dock.provenance"] == att


def test_unsigned_build_writes_no_signature_tag():
    (update,) = updates_for(
        job(state=JobState.SUCCEEDED, image="reg/m:3", digest=DIGEST, sbom="reg/m@" + DIGEST)
    )
    assert "mlflow_dock.signature" not in update.set_tags
    assert "mlflow_dock.provenance" not in update.set_tags


def test_build_failure_writes_reason():
    (update,) = updates_for(job(state=JobState.FAILED, error="smoke test: 500"))
    assert update.set_tags == {
        "mlflow_dock.status": "failed",
        "mlflow_dock.error": "smoke test: 500",
    }


def test_alias_and_unalias():
    (set_,) = updates_for(
        job(kind=JobKind.ALIAS, alias="champion", state=JobState.SUCCEEDED, image="reg/m:champion")
    )
    assert set_.set_tags == {"mlflow_dock.alias.champion": "reg/m:champion"}
    (unset,) = updates_for(job(kind=JobKind.UNALIAS, alias="champion", state=JobState.SUCCEEDED))
    assert unset.delete_tags == ("mlflow_dock.alias.champion",)
    assert (
        updates_for(job(kind=JobKind.UNALIAS, alias="x", version="", state=JobState.SUCCEEDED))
        == []
    )


class FlakySource:
    def __init__(self, failures):
        self.failures = failures
        self.applied = []

    def update_tags(self, name, version, set_tags, delete_tags):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("MLflow down")
        self.applied.append((name, version, set_tags, delete_tags))


@pytest.fixture
def store(tmp_path):
    s = JobStore.from_url(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def test_failures_stay_pending_and_are_never_raised(store):
    source = FlakySource(failures=3)
    wb = MlflowWriteBack(source, store, max_backoff_seconds=0.1)  # type: ignore[arg-type]
    wb.job_changed(job(state=JobState.FAILED, error="x"))
    for _ in range(3):  # MLflow down: kept, backing off, however many times it fails
        assert wb.flush_once() == 0
        assert store.pending_tag_writes() == []  # not due yet
        time.sleep(0.15)
    assert len(store.pending_tag_writes()) == 2
    assert wb.flush_once() == 2
    assert source.applied == [
        ("m", "3", {"mlflow_dock.status": "failed", "mlflow_dock.error": "x"}, ())
    ]


def test_the_status_is_written_last_so_its_reader_finds_the_rest(store):
    """The status row is older (queued, running) than the error's: still applied after it."""
    source = FlakySource(failures=0)
    wb = MlflowWriteBack(source, store)  # type: ignore[arg-type]
    wb.job_changed(job(state=JobState.RUNNING))
    wb.job_changed(job(state=JobState.FAILED, error="smoke test: no answer"))
    assert wb.flush_once() == 2
    ((_, _, set_tags, _),) = source.applied
    assert list(set_tags) == ["mlflow_dock.error", "mlflow_dock.status"]
    assert set_tags["mlflow_dock.status"] == "failed"


def test_newest_value_wins_and_survives_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = JobStore.from_url(url)
    wb = MlflowWriteBack(FlakySource(failures=0), first, is_leader=lambda: False)  # type: ignore[arg-type]
    wb.job_changed(job(state=JobState.RUNNING))
    wb.job_changed(job(state=JobState.SUCCEEDED, image="reg/m:3", digest=DIGEST))
    first.close()  # the process stops before it flushed
    second = JobStore.from_url(url)
    source = FlakySource(failures=0)
    MlflowWriteBack(source, second).flush()  # type: ignore[arg-type]
    assert source.applied == [
        (
            "m",
            "3",
            {
                "mlflow_dock.status": "succeeded",
                "mlflow_dock.image": f"reg/m@{DIGEST}",
                "mlflow_dock.endpoints": "POST /invocations (MLflow scoring protocol)",
            },
            ("mlflow_dock.error",),
        )
    ]
    assert second.pending_tag_writes() == []
    second.close()


def test_only_the_leader_flushes(store):
    source = FlakySource(failures=0)
    wb = MlflowWriteBack(source, store, interval_seconds=0.05, is_leader=lambda: False)  # type: ignore[arg-type]
    wb.start()
    wb.job_changed(job(state=JobState.RUNNING))
    time.sleep(0.3)
    wb.stop()
    assert source.applied == [] and len(store.pending_tag_writes()) == 1


class RefusingSource:
    def __init__(self, code):
        self.code = code
        self.calls = 0

    def update_tags(self, name, version, set_tags, delete_tags):
        from mlflow_dock.mlflow.client import MlflowRefusedError

        self.calls += 1
        raise MlflowRefusedError(f"writing tags: {self.code}", code=self.code)


def test_tags_for_a_version_mlflow_does_not_have_are_dropped_not_retried_forever(store):
    source = RefusingSource("RESOURCE_DOES_NOT_EXIST")
    wb = MlflowWriteBack(source, store, max_backoff_seconds=0.1)  # type: ignore[arg-type]
    wb.job_changed(job(version="999", state=JobState.FAILED, error="no such version"))
    assert wb.flush_once() == 0
    time.sleep(0.15)
    assert store.pending_tag_writes() == [] and wb.flush_once() == 0
    assert source.calls == 1


def test_a_credentials_refusal_keeps_the_tags_pending(store):
    # An operator can fix credentials; the tags must still arrive then.
    source = RefusingSource("PERMISSION_DENIED")
    wb = MlflowWriteBack(source, store, max_backoff_seconds=0.1)  # type: ignore[arg-type]
    wb.job_changed(job(state=JobState.FAILED, error="x"))
    assert wb.flush_once() == 0
    time.sleep(0.15)
    assert len(store.pending_tag_writes()) == 2


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_outcome_recorded_with_its_tags_reaches_mlflow_after_a_crash(kind, tmp_path):
    """The worker stores the outcome and its tags in one commit: a process that dies right
    after it (before any change hook ran) still gets its tags written by the next leader."""
    with database(kind, tmp_path) as url:
        worker = JobStore.from_url(url)
        queued, _ = worker.request_build("m", "3")
        worker.claim_next(owner="w", lease_seconds=30)
        worker.succeed(
            queued.id, image="reg/m:3", digest=DIGEST, owner="w", tag_writes=tag_writes_for
        )
        worker.close()  # killed here: no on_change, no flush
        leader = JobStore.from_url(url)
        source = FlakySource(failures=0)
        MlflowWriteBack(source, leader).flush()  # type: ignore[arg-type]
        leader.close()
    assert source.applied == [
        (
            "m",
            "3",
            {
                "mlflow_dock.status": "succeeded",
                "mlflow_dock.image": f"reg/m@{DIGEST}",
                "mlflow_dock.endpoints": "POST /invocations (MLflow scoring protocol)",
            },
            ("mlflow_dock.error",),
        )
    ]
