"""The job queue: claims, leases, reclaiming, and outcomes (with their MLflow tags)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from mlflow_dock.errors import LeaseLostError
from mlflow_dock.jobs.model import LANE_KINDS, JobKind, JobState, Lane
from mlflow_dock.store.facade import JobStore

LEASE = 30.0
DIGEST_A = "sha256:" + "a" * 64
BUILDS = LANE_KINDS[Lane.BUILD]
ALIASES = LANE_KINDS[Lane.ALIAS]


def claim(store: JobStore, owner: str = "w1", lease: float = LEASE):
    return store.claim_next(owner=owner, lease_seconds=lease)


def test_claim_is_exclusive_across_threads_and_stores(store_url):
    stores = [JobStore.from_url(store_url) for _ in range(3)]
    for v in range(1, 7):
        stores[0].request_build("m", str(v))
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(s: JobStore, name: str) -> None:
        while (job := s.claim_next(owner=name, lease_seconds=LEASE)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(stores[i % 3], f"w{i}")) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 6 == len(set(claimed))
    for s in stores:
        s.close()


def test_claim_sets_owner_and_lease(store):
    job, _ = store.request_build("m", "1")
    claimed = claim(store, "host:1", 10)
    assert claimed.owner == "host:1" and claimed.lease_expires_at is not None
    done = store.succeed(job.id, image="r/m:1", digest=DIGEST_A, owner="host:1")
    assert done.owner is None and done.lease_expires_at is None


def test_only_expired_leases_are_reclaimed(store):
    short, _ = store.request_build("m", "1")
    long, _ = store.request_build("m", "2")
    claim(store, "w1", 1.5)
    claim(store, "w2", 60)
    assert store.reclaim_expired() == []
    time.sleep(1.6)
    reclaimed = store.reclaim_expired()
    assert [j.id for j in reclaimed] == [short.id]
    assert reclaimed[0].state is JobState.QUEUED and "expired" in (reclaimed[0].error or "")
    assert store.get(long.id).state is JobState.RUNNING
    again = claim(store, "w3")
    assert again.id == short.id and again.attempts == 2


def test_heartbeat_keeps_the_lease(store):
    job, _ = store.request_build("m", "1")
    claim(store, "w1", 1.0)
    for _ in range(4):
        time.sleep(0.3)
        assert store.renew_lease(job.id, owner="w1", lease_seconds=1.0)
    assert store.reclaim_expired() == []  # 1.2 s after a 1 s lease was taken
    assert not store.renew_lease(job.id, owner="someone-else", lease_seconds=1.0)


def test_a_worker_that_lost_its_lease_cannot_record_an_outcome(store):
    job, _ = store.request_build("m", "1")
    claim(store, "old", 0.1)
    time.sleep(0.2)
    store.reclaim_expired()
    claim(store, "new")
    assert not store.renew_lease(job.id, owner="old", lease_seconds=LEASE)
    for finish in (
        lambda: store.succeed(job.id, image="r/m:1", digest=DIGEST_A, owner="old"),
        lambda: store.fail(job.id, "boom", owner="old"),
        lambda: store.retry_later(job.id, "503", 1, owner="old"),
    ):
        with pytest.raises(LeaseLostError):
            finish()
    done = store.succeed(job.id, image="r/m:1", digest=DIGEST_A, owner="new")
    assert done.state is JobState.SUCCEEDED


def test_claim_by_id_only_when_runnable(store):
    build, _ = store.request_build("m", "1")
    alias, _ = store.request_alias("m", "1", "prod")
    assert store.claim(alias.id, owner="w", lease_seconds=LEASE) is None  # build not done
    assert store.claim(build.id, owner="w", lease_seconds=LEASE).id == build.id
    assert store.claim(build.id, owner="w2", lease_seconds=LEASE) is None  # already claimed
    store.succeed(build.id, image="r/m:1", digest=DIGEST_A, owner="w")
    assert store.claim(alias.id, owner="w", lease_seconds=LEASE).id == alias.id


def test_alias_waits_for_its_build(store):
    build, _ = store.request_build("m", "3")
    alias, _ = store.request_alias("m", "3", "champion", delivery_id="a1")
    assert alias.kind is JobKind.ALIAS and alias.depends_on == build.id
    assert claim(store).id == build.id
    assert claim(store) is None  # alias blocked while the build runs
    store.succeed(build.id, image="r/m:3", digest=DIGEST_A)
    claimed = claim(store)
    assert claimed.id == alias.id and claimed.state is JobState.RUNNING


def test_each_lane_claims_only_its_kinds_whatever_arrived_first(store):
    built, _ = store.request_build("m", "1")
    claim(store)
    store.succeed(built.id, image="r/m:1", digest=DIGEST_A)
    queued = [store.request_build("m", str(v))[0] for v in (2, 3)]
    alias, _ = store.request_alias("m", "1", "champion")
    unset, _ = store.request_unalias("m", "old")
    # The alias arrived after two builds: the alias lane takes it first all the same...
    assert store.claim_next(owner="a", lease_seconds=LEASE, kinds=ALIASES).id == alias.id
    # ... in arrival order with the other alias jobs, and never a build.
    assert store.claim_next(owner="a", lease_seconds=LEASE, kinds=ALIASES).id == unset.id
    assert store.claim_next(owner="a", lease_seconds=LEASE, kinds=ALIASES) is None
    assert store.claim_next(owner="b", lease_seconds=LEASE, kinds=BUILDS).id == queued[0].id
    assert store.claim_next(owner="b", lease_seconds=LEASE, kinds=BUILDS).id == queued[1].id
    assert store.claim_next(owner="b", lease_seconds=LEASE, kinds=BUILDS) is None


def test_the_alias_lane_still_waits_for_the_version_build(store):
    build, _ = store.request_build("m", "1")
    alias, _ = store.request_alias("m", "1", "champion")
    assert store.claim_next(owner="a", lease_seconds=LEASE, kinds=ALIASES) is None
    store.claim_next(owner="b", lease_seconds=LEASE, kinds=BUILDS)
    assert store.claim_next(owner="a", lease_seconds=LEASE, kinds=ALIASES) is None
    store.succeed(build.id, image="r/m:1", digest=DIGEST_A, owner="b")
    assert store.claim_next(owner="a", lease_seconds=LEASE, kinds=ALIASES).id == alias.id


def test_expired_leases_and_wakeups_are_per_lane(store):
    build, _ = store.request_build("m", "1")
    store.claim_next(owner="b", lease_seconds=0.2, kinds=BUILDS)
    store.succeed(build.id, image="r/m:1", digest=DIGEST_A, owner="b")
    alias, _ = store.request_alias("m", "1", "champion")
    second, _ = store.request_build("m", "2")
    store.claim_next(owner="a", lease_seconds=0.2, kinds=ALIASES)
    store.claim_next(owner="b", lease_seconds=0.2, kinds=BUILDS)
    time.sleep(0.3)
    assert [j.id for j in store.reclaim_expired(kinds=ALIASES)] == [alias.id]
    assert [j.id for j in store.reclaim_expired(kinds=BUILDS)] == [second.id]
    store.claim_next(owner="b", lease_seconds=LEASE, kinds=BUILDS)
    store.retry_later(second.id, "registry 503", 60, owner="b")
    assert store.next_wakeup(kinds=ALIASES) is None
    assert store.next_wakeup(kinds=BUILDS) == store.next_wakeup() is not None


def test_a_claim_passes_over_candidates_other_workers_won(store_url):
    """Candidates are read before the write lock: one taken in between is passed over."""
    me, other = JobStore.from_url(store_url), JobStore.from_url(store_url)
    try:
        first, _ = me.request_build("m", "1")
        second, _ = me.request_build("m", "2")
        write = me._db.write

        @contextmanager
        def raced_write():
            # Another worker claims the oldest candidate between this worker's read and write.
            other.claim(first.id, owner="other", lease_seconds=LEASE)
            with write() as session:
                yield session

        me._db.write = raced_write  # type: ignore[method-assign]
        claimed = me.claim_next(owner="me", lease_seconds=LEASE)
        assert claimed.id == second.id and claimed.owner == "me"
        assert me.get(first.id).owner == "other"
    finally:
        me.close()
        other.close()


def test_retry_later_delays_the_job(store):
    job, _ = store.request_build("m", "1")
    claimed = claim(store)
    assert claimed.attempts == 1
    store.retry_later(job.id, "registry 503", delay_seconds=0.3)
    assert claim(store) is None
    assert store.next_wakeup() is not None
    time.sleep(0.35)
    again = claim(store)
    assert again.id == job.id and again.attempts == 2


def test_waiting_is_visible(store):
    job, _ = store.request_build("m", "1")
    claim(store)
    waiting = store.retry_later(job.id, "registry down", 5, waiting=True, owner="w1")
    assert waiting.state is JobState.QUEUED and waiting.error == "waiting: registry down"


def test_a_restart_does_not_requeue_jobs_with_live_leases(store_url):
    first = JobStore.from_url(store_url)
    job, _ = first.request_build("m", "1")
    first.claim_next(owner="other-replica", lease_seconds=LEASE)
    second = JobStore.from_url(store_url)
    assert second.reclaim_expired() == []
    assert second.get(job.id).state is JobState.RUNNING
    first.close()
    second.close()


def test_succeed_records_image_and_timings(store):
    job, _ = store.request_build("m", "1")
    claim(store)
    done = store.succeed(job.id, image="r/m:1", digest="sha256:" + "b" * 64, tags=("r/m:1",))
    assert done.state is JobState.SUCCEEDED and done.tags == ("r/m:1",)
    assert done.duration_seconds is not None and done.duration_seconds >= 0


def test_unalias_remembers_the_alias_target_and_runs_after_earlier_alias_ops(store):
    build, _ = store.request_build("m", "1")
    claim(store)
    store.succeed(build.id, image="r/m:1", digest=DIGEST_A)
    set_alias, _ = store.request_alias("m", "1", "champion")
    unset, _ = store.request_unalias("m", "champion", delivery_id="u1")
    assert unset.kind is JobKind.UNALIAS and unset.version == "1"
    assert claim(store).id == set_alias.id
    assert claim(store) is None  # the delete waits for the set to finish
    store.succeed(set_alias.id, image="r/m:champion", digest=DIGEST_A)
    assert claim(store).id == unset.id


def test_fail_records_whether_retrying_could_help(store):
    job, _ = store.request_build("m", "1")
    claim(store)
    assert store.fail(job.id, "registry 503", permanent=False).permanent is False


def _status_tags(job):
    return [(job.model_name, job.version, {"mlflow_dock.status": job.state.value})]


def test_an_outcome_and_its_tag_writes_commit_together(store):
    job, _ = store.request_build("m", "1")
    claim(store, owner="w")
    done = store.succeed(job.id, image="r/m:1", digest=DIGEST_A, owner="w", tag_writes=_status_tags)
    assert done.state is JobState.SUCCEEDED
    assert [(w.tag, w.value) for w in store.pending_tag_writes()] == [
        ("mlflow_dock.status", "succeeded")
    ]


def test_an_outcome_is_not_recorded_without_its_tag_writes(store):
    """One transaction: if the tags cannot be stored, neither is the outcome (and vice versa)."""
    job, _ = store.request_build("m", "1")
    claim(store, owner="w")

    def broken(_job):
        raise RuntimeError("crash between the outcome and its tags")

    with pytest.raises(RuntimeError):
        store.fail(job.id, "bad", owner="w", tag_writes=broken)
    assert store.get(job.id).state is JobState.RUNNING  # rolled back, still the worker's
    assert store.pending_tag_writes() == []
    store.retry_later(job.id, "503", 0, owner="w", tag_writes=_status_tags)
    assert store.get(job.id).state is JobState.QUEUED
    assert [w.value for w in store.pending_tag_writes()] == ["queued"]


def test_a_lost_lease_stores_neither_outcome_nor_tags(store):
    job, _ = store.request_build("m", "1")
    claim(store, owner="w")
    with pytest.raises(LeaseLostError):
        store.succeed(job.id, image="i", digest=DIGEST_A, owner="other", tag_writes=_status_tags)
    assert store.pending_tag_writes() == []


def test_supply_chain_references_are_recorded_with_the_outcome(store):
    store.request_build("m", "1")
    job = claim(store)
    refs = {
        "sbom": "r/m@sha256:" + "a" * 64,
        "signature": "r/m@sha256:" + "b" * 64,
        "provenance": "r/m@sha256:" + "c" * 64,
    }
    done = store.succeed(job.id, image="r/m:1", digest=DIGEST_A, owner=job.owner, **refs)
    for got in (done, store.get(job.id)):
        assert (got.sbom, got.signature, got.provenance) == tuple(refs.values())


def test_the_modelcar_and_v2_name_are_recorded_with_the_outcome(store):
    store.request_build("m", "1")
    job = claim(store)
    car = "r/m@sha256:" + "e" * 64
    done = store.succeed(
        job.id, image="r/m:1", digest=DIGEST_A, owner=job.owner, modelcar=car, v2_model="m"
    )
    for got in (done, store.get(job.id)):
        assert (got.modelcar, got.v2_model) == (car, "m")
