from __future__ import annotations

from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.mlflow.writeback import MlflowWriteBack, updates_for

DIGEST = "sha256:" + "d" * 64


def job(**kw):
    base = dict(id="j", kind=JobKind.BUILD, model_name="m", version="3", state=JobState.RUNNING)
    return Job(**{**base, **kw})


def test_build_success_writes_image_with_digest_and_clears_error():
    (update,) = updates_for(job(state=JobState.SUCCEEDED, image="reg/m:3", digest=DIGEST))
    assert update.set_tags == {
        "mlflow_dock.status": "succeeded",
        "mlflow_dock.image": f"reg/m@{DIGEST}",
    }
    assert update.delete_tags == ("mlflow_dock.error",)


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


def test_failures_are_retried_and_never_raised():
    source = FlakySource(failures=2)
    wb = MlflowWriteBack(source, attempts=3, sleep=lambda _s: None)  # type: ignore[arg-type]
    wb.start()
    wb.job_changed(job(state=JobState.FAILED, error="x"))
    wb.flush()
    wb.stop()
    assert len(source.applied) == 1


def test_gives_up_after_attempts():
    source = FlakySource(failures=10)
    wb = MlflowWriteBack(source, attempts=2, sleep=lambda _s: None)  # type: ignore[arg-type]
    wb.start()
    wb.job_changed(job())
    wb.flush()
    wb.stop()
    assert source.applied == []
