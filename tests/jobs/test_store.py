"""The job store, on SQLite and PostgreSQL (fixtures in conftest.py)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from mlflow_dock.errors import LeaseLostError, NotFoundError
from mlflow_dock.jobs.model import JobKind, JobState, build_key
from mlflow_dock.jobs.store import JobStore, store_unavailable

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


def test_take_unsent_announces_each_runnable_job_once(store):
    build, _ = store.request_build("m", "1")
    alias, _ = store.request_alias("m", "1", "prod")
    assert store.take_unsent(resend_after_seconds=60) == [build.id]
    assert store.take_unsent(resend_after_seconds=60) == []
    # A message that did not lead to a claim within the resend window is sent again.
    time.sleep(0.3)
    assert store.take_unsent(resend_after_seconds=0.2) == [build.id]
    store.claim(build.id, owner="w", lease_seconds=LEASE)
    store.succeed(build.id, image="r/m:1", digest=DIGEST_A, owner="w")
    assert store.take_unsent(resend_after_seconds=60) == [alias.id]


def test_retried_and_reclaimed_jobs_are_announced_again(store):
    job, _ = store.request_build("m", "1")
    store.mark_enqueued(job.id)
    assert store.take_unsent(resend_after_seconds=60) == []
    store.claim(job.id, owner="w", lease_seconds=LEASE)
    store.retry_later(job.id, "503", 0, owner="w")
    assert store.take_unsent(resend_after_seconds=60) == [job.id]


def test_alias_waits_for_its_build(store):
    build, _ = store.request_build("m", "3")
    alias, _ = store.request_alias("m", "3", "champion", delivery_id="a1")
    assert alias.kind is JobKind.ALIAS and alias.depends_on == build.id
    assert claim(store).id == build.id
    assert claim(store) is None  # alias blocked while the build runs
    store.succeed(build.id, image="r/m:3", digest=DIGEST_A)
    claimed = claim(store)
    assert claimed.id == alias.id and claimed.state is JobState.RUNNING


def test_alias_for_unbuilt_version_creates_the_build(store):
    alias, _ = store.request_alias("m", "7", "staging")
    build = store.build_for("m", "7")
    assert build is not None and alias.depends_on == build.id


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


def test_watch_since_is_set_once(store):
    assert store.watch_since() == store.watch_since()


def test_named_lease_has_one_holder_until_it_expires(store):
    assert store.try_lock("leader", owner="a", lease_seconds=1.0)
    assert not store.try_lock("leader", owner="b", lease_seconds=1.0)
    assert store.try_lock("leader", owner="a", lease_seconds=1.0)  # renewal
    assert store.lock_owner("leader") == "a"
    time.sleep(1.1)
    assert store.try_lock("leader", owner="b", lease_seconds=1.0)
    store.release_lock("leader", owner="a")  # not a's any more: no effect
    assert store.lock_owner("leader") == "b"
    store.release_lock("leader", owner="b")
    assert store.try_lock("leader", owner="a", lease_seconds=0.3)


def test_tag_writes_keep_the_newest_value_and_survive_a_restart(store_url):
    first = JobStore.from_url(store_url)
    first.record_tag_writes("m", "1", {"mlflow_dock.status": "running"})
    first.record_tag_writes("m", "1", {"mlflow_dock.status": "succeeded", "x": None})
    first.close()
    second = JobStore.from_url(store_url)
    pending = {w.tag: w.value for w in second.pending_tag_writes()}
    assert pending == {"mlflow_dock.status": "succeeded", "x": None}
    second.close()


def test_a_tag_overwritten_during_a_flush_is_kept(store):
    store.record_tag_writes("m", "1", {"s": "running"})
    (write,) = store.pending_tag_writes()
    store.record_tag_writes("m", "1", {"s": "succeeded"})
    store.tag_write_done(write)  # wrote "running"; "succeeded" must still be written
    assert [w.value for w in store.pending_tag_writes()] == ["succeeded"]
    (newer,) = store.pending_tag_writes()
    store.tag_write_failed(newer, "MLflow 503", retry_in_seconds=60)
    assert store.pending_tag_writes() == []  # backing off, not dropped


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


def test_recording_a_pending_value_again_writes_it_once(store):
    store.record_tag_writes("m", "1", {"s": "succeeded"})
    (write,) = store.pending_tag_writes()
    store.record_tag_writes("m", "1", {"s": "succeeded"})  # the change hook after the outcome
    store.tag_write_done(write)
    assert store.pending_tag_writes() == []


def test_sqlite_store_from_nul_key_era_stays_readable(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    old = JobStore.from_url(url)
    job, _ = old.request_build("m", "1")
    with old._engine.begin() as connection:  # an older version's row
        connection.execute(
            text("UPDATE jobs SET dedupe_key = :k WHERE id = :i"),
            {"k": "build\x00m\x001", "i": job.id},
        )
        # ... and its schema, from before leases and write-back rows.
        for column in ("owner", "lease_expires_at", "enqueued_at"):
            connection.execute(text(f"ALTER TABLE jobs DROP COLUMN {column}"))
    old.close()
    reopened = JobStore.from_url(url)
    assert reopened.build_for("m", "1").id == job.id
    assert reopened.request_build("m", "1")[0].id == job.id
    reopened.close()


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


def test_an_unreachable_database_is_recognised_as_transient():
    from support.servers import free_port

    with pytest.raises(Exception) as raised:
        JobStore.from_url(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    assert store_unavailable(raised.value)
    assert not store_unavailable(ValueError("a bug"))


def test_replicas_starting_together_all_open_the_store(store_url):
    opened: list[JobStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            opened.append(JobStore.from_url(store_url))
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 4
    for s in opened:
        s.close()


def test_runtime_images_are_remembered_per_repository(store):
    key = "native/" + "k" * 200  # longer than a meta key: stored under a hash
    assert store.runtime_image(key, "reg/team/a") is None
    store.remember_runtime_image(key, "reg/team/a", "sha256:" + "1" * 64)
    store.remember_runtime_image(key, "reg/team/a", "sha256:" + "2" * 64)  # rebuilt: newest
    assert store.runtime_image(key, "reg/team/a") == "sha256:" + "2" * 64
    assert store.runtime_image(key, "reg/team/b") is None
