"""The Celery dispatch outbox: which runnable jobs still need a message."""

from __future__ import annotations

import time

from mlflow_dock.jobs.model import LANE_KINDS, Lane

LEASE = 30.0
DIGEST_A = "sha256:" + "a" * 64


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


def test_alias_jobs_stay_off_the_broker_when_the_replicas_lanes_run_them(store):
    build, _ = store.request_build("m", "1")
    store.claim(build.id, owner="w", lease_seconds=LEASE)
    store.succeed(build.id, image="r/m:1", digest=DIGEST_A, owner="w")
    store.request_alias("m", "1", "prod")
    second, _ = store.request_build("m", "2")
    builds_only = LANE_KINDS[Lane.BUILD]
    assert store.take_unsent(resend_after_seconds=60, kinds=builds_only) == [second.id]
    assert store.take_unsent(resend_after_seconds=60, kinds=builds_only) == []
