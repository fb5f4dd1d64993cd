"""`JobStore.accept_deliveries` (group commit) against the one-request-at-a-time methods."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_dock.jobs.model import JobKind, JobState
from mlflow_dock.jobs.store import DeliveryRequest, JobStore


def _one_by_one(store: JobStore, request: DeliveryRequest):
    if request.kind is JobKind.BUILD:
        return store.request_build(
            request.model_name, request.version, delivery_id=request.delivery_id
        )
    if request.kind is JobKind.ALIAS:
        return store.request_alias(
            request.model_name, request.version, request.alias, delivery_id=request.delivery_id
        )
    return store.request_unalias(request.model_name, request.alias, delivery_id=request.delivery_id)


def _fail_build(store: JobStore, model: str, version: str) -> None:
    job, _ = store.request_build(model, version)
    claimed = store.claim(job.id, owner="t", lease_seconds=30)
    assert claimed is not None
    store.fail(job.id, "broken", permanent=True)


def _snapshot(store: JobStore, results):
    """Jobs and answers with ids replaced by labels in creation order (ids are random)."""
    jobs = sorted(store.list(limit=1000), key=lambda j: (j.created_at, j.id))
    label = {job.id: f"j{i}" for i, job in enumerate(jobs)}
    rows = [
        (label[j.id], j.kind, j.model_name, j.version, j.alias, label.get(j.depends_on), j.state)
        for j in jobs
    ]
    answers = [(label[job.id], job.state, changed) for job, changed in results]
    return rows, answers


_requests = st.lists(
    st.tuples(
        st.sampled_from([JobKind.BUILD, JobKind.BUILD, JobKind.ALIAS, JobKind.UNALIAS]),
        st.sampled_from(["m", "n"]),
        st.sampled_from(["1", "2", "3"]),
        st.sampled_from(["champion", "canary"]),
        st.integers(min_value=0, max_value=12),  # delivery ids repeat: replays
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=_requests, batch=st.integers(min_value=1, max_value=25))
def test_batches_give_the_same_jobs_and_answers_as_one_request_at_a_time(requests, batch):
    with tempfile.TemporaryDirectory() as tmp:
        single = JobStore.from_url(f"sqlite:///{Path(tmp) / 'single.db'}")
        grouped = JobStore.from_url(f"sqlite:///{Path(tmp) / 'grouped.db'}")
        for store in (single, grouped):
            # History that sends the batch path down its rare branches: a failed build asked
            # for again, and an alias whose target a later delete must find.
            _fail_build(store, "m", "2")
            store.request_alias("n", "1", "champion")
        items = [
            DeliveryRequest(
                f"d{delivery}", kind, model, "" if kind is JobKind.UNALIAS else version, alias
            )
            for kind, model, version, alias, delivery in requests
        ]
        expected = [_one_by_one(single, r) for r in items]
        got = []
        for start in range(0, len(items), batch):
            got.extend(grouped.accept_deliveries(items[start : start + batch]))
        assert _snapshot(grouped, got) == _snapshot(single, expected)
        for r in items:
            assert grouped.job_for_delivery(r.delivery_id) is not None
        single.close()
        grouped.close()


def test_a_batch_is_one_transaction_with_ordered_distinct_creation_times(store):
    requests = [
        DeliveryRequest(f"d{i}", JobKind.ALIAS, "m", "1", "champion" if i % 2 else "canary")
        for i in range(40)
    ]
    results = store.accept_deliveries(requests)
    assert all(changed for _, changed in results)
    jobs = [job for job, _ in results]
    build_ids = {job.depends_on for job in jobs}
    assert len(build_ids) == 1  # one build job for the version, whatever the number of events
    times = [job.created_at for job in jobs]
    assert times == sorted(times) and len(set(times)) == len(times)
    stored = {j.id: j for j in store.list(limit=100)}
    assert [stored[j.id].created_at for j in jobs] == times


def test_replays_inside_and_across_batches_are_duplicates(store):
    first = store.accept_deliveries(
        [
            DeliveryRequest("d1", JobKind.BUILD, "m", "1"),
            DeliveryRequest("d1", JobKind.BUILD, "m", "1"),
        ]
    )
    assert [changed for _, changed in first] == [True, False]
    assert first[0][0].id == first[1][0].id
    again = store.accept_deliveries([DeliveryRequest("d1", JobKind.BUILD, "m", "1")])
    assert again[0][0].id == first[0][0].id and not again[0][1]
    assert store.accept_deliveries([]) == []


def test_failed_build_is_requeued_once_per_batch(store):
    _fail_build(store, "m", "1")
    results = store.accept_deliveries(
        [
            DeliveryRequest("d1", JobKind.BUILD, "m", "1"),
            DeliveryRequest("d2", JobKind.BUILD, "m", "1"),
        ]
    )
    assert [changed for _, changed in results] == [True, False]
    assert store.build_for("m", "1").state is JobState.QUEUED


def _pending(store: JobStore):
    # Revisions only order overwrites against a flush; inside one transaction none can read
    # an intermediate value, so a batch may count fewer of them.
    return sorted((w.model_name, w.version, w.tag, w.value) for w in store.pending_tag_writes())


def test_many_tag_writes_in_one_transaction_match_one_at_a_time(store_url, tmp_path):
    single = JobStore.from_url(f"sqlite:///{tmp_path / 'single.db'}")
    grouped = JobStore.from_url(store_url)
    writes = [
        ("m", "1", {"mlflow_dock.status": "queued"}),
        ("m", "2", {"mlflow_dock.status": "queued", "mlflow_dock.error": None}),
        ("m", "1", {"mlflow_dock.status": "running"}),  # newest value wins
    ]
    for store in (single, grouped):
        store.record_tag_writes("m", "2", {"mlflow_dock.status": "failed"})  # an existing row
    for write in writes:
        single.record_tag_writes(*write)
    grouped.record_tag_writes_many(writes)
    grouped.record_tag_writes_many([])
    assert _pending(grouped) == _pending(single)
    overwritten = [
        w for w in grouped.pending_tag_writes() if (w.version, w.tag) == ("2", "mlflow_dock.status")
    ]
    assert [(w.value, w.revision) for w in overwritten] == [("queued", 1)]
    single.close()
    grouped.close()


def _status_tags(job):
    return [(job.model_name, job.version, {"mlflow_dock.status": job.state.value})]


def test_tags_of_the_jobs_a_batch_queues_are_stored_with_them(store):
    store.request_build("m", "1", delivery_id="old")
    results = store.accept_deliveries(
        [
            DeliveryRequest("old", JobKind.BUILD, "m", "1"),  # a replay: no new tags
            DeliveryRequest("d1", JobKind.BUILD, "m", "2"),
            DeliveryRequest("d2", JobKind.BUILD, "m", "2"),  # same version, other delivery
            DeliveryRequest("d3", JobKind.ALIAS, "m", "3", "champion"),
        ],
        tag_writes=_status_tags,
    )
    assert [changed for _, changed in results] == [False, True, False, True]
    pending = sorted((w.version, w.tag, w.value) for w in store.pending_tag_writes())
    # The alias job and the build it created both queued; version 3 is written once.
    assert pending == [("2", "mlflow_dock.status", "queued"), ("3", "mlflow_dock.status", "queued")]


def test_a_batch_whose_tags_cannot_be_stored_stores_no_job(store):
    def broken(_job):
        raise RuntimeError("no tags")

    with pytest.raises(RuntimeError):
        store.accept_deliveries([DeliveryRequest("d1", JobKind.BUILD, "m", "1")], tag_writes=broken)
    assert store.job_for_delivery("d1") is None and store.list() == []
