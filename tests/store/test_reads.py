"""Reading jobs."""

from __future__ import annotations

import pytest

from mlflow_dock.errors import NotFoundError
from mlflow_dock.jobs.model import JobState


def test_unknown_job_is_not_found(store):
    with pytest.raises(NotFoundError):
        store.get("nope")


def test_list_filters(store):
    store.request_build("a", "1")
    store.request_build("b", "1")
    assert [j.model_name for j in store.list(model_name="a")] == ["a"]
    assert len(store.list(state=JobState.QUEUED)) == 2
    assert store.count_by_state()[JobState.QUEUED] == 2


def _published(store, model: str, version: str, image: str) -> None:
    job, _ = store.request_build(model, version)
    claimed = store.claim(job.id, owner="w", lease_seconds=30)
    assert claimed is not None
    store.succeed(job.id, image=image, digest="sha256:" + "a" * 64, owner="w")


def test_the_owner_of_a_repository_is_the_other_model_that_published_there(store):
    _published(store, "Fraud Model", "1", "r.io/team/fraud-model-0123456789:1")
    assert store.repository_owner("r.io/team/fraud-model-0123456789", other_than="x") == (
        "Fraud Model"
    )
    # Its own repository, a repository that only shares a prefix, and one nobody used.
    assert (
        store.repository_owner("r.io/team/fraud-model-0123456789", other_than="Fraud Model") is None
    )
    assert store.repository_owner("r.io/team/fraud-model-01234", other_than="x") is None
    assert store.repository_owner("r.io/team/other", other_than="x") is None
