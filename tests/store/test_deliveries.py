"""Deliveries becoming jobs: one request at a time, and many in one transaction (group commit)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_dock.jobs.model import JobKind, JobState, build_key
from mlflow_dock.store.deliveries import DeliveryRequest
from mlflow_dock.store.facade import JobStore

LEASE = 30.0
DIGEST_A = "sha256:" + "a" * 64


def claim(store: JobStore, owner: str = "w1", lease: float = LEASE):
    return store.claim_next(owner=owner, lease_seconds=lease)


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


def test_names_with_any_characters_are_stored(store):
    # PostgreSQL refuses NUL in text; the key must not need it to stay unambiguous.
    names = ['a"b', "a,b", "a\\", "ünï", "a b"]
    for name in names:
        store.request_build(name, "1")
    assert {j.model_name for j in store.list()} == set(names)
    assert "\x00" not in build_key("a", "1")
    assert build_key("a,b", "1") != build_key("a", "b,1")


def test_concurrent_requests_for_one_version_make_one_job(store_url):
    stores = [JobStore.from_url(store_url) for _ in range(4)]
    ids: list[str] = []
    lock = threading.Lock()

    def request(s: JobStore, i: int) -> None:
        job, _ = s.request_build("m", "1", delivery_id=f"d{i % 2}")
        with lock:
            ids.append(job.id)

    threads = [threading.Thread(target=request, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(stores[0].list()) == 1
    for s in stores:
        s.close()


def test_failed_build_is_requeued_by_a_new_event(store):
    job, _ = store.request_build("m", "1")
    claim(store)
    store.fail(job.id, "boom", owner="w1")
    again, changed = store.request_build("m", "1", delivery_id="d9")
    assert changed and again.id == job.id and again.state is JobState.QUEUED
    assert again.error is None and again.attempts == 0


def test_alias_of_a_failed_build_is_applied_when_the_version_is_rebuilt(store):
    build, _ = store.request_build("m", "1")
    alias, _ = store.request_alias("m", "1", "champion")
    claim(store)
    store.fail(build.id, "model broken")
    assert claim(store).id == alias.id
    store.fail(alias.id, "version 1 has no image")
    store.request_build("m", "1", delivery_id="again")
    assert store.get(alias.id).state is JobState.QUEUED
    assert claim(store).id == build.id
    assert claim(store) is None  # the alias waits for the rebuild again
    store.succeed(build.id, image="r/m:1", digest=DIGEST_A)
    assert claim(store).id == alias.id


def test_superseded_failed_alias_is_not_requeued(store):
    build, _ = store.request_build("m", "1")
    old, _ = store.request_alias("m", "1", "champion")
    claim(store)
    store.fail(build.id, "broken")
    claim(store)
    store.fail(old.id, "no image")
    store.request_unalias("m", "champion")
    store.request_build("m", "1")
    assert store.get(old.id).state is JobState.FAILED


def test_alias_for_unbuilt_version_creates_the_build(store):
    alias, _ = store.request_alias("m", "7", "staging")
    build = store.build_for("m", "7")
    assert build is not None and alias.depends_on == build.id


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
