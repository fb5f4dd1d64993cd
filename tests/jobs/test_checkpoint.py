"""`Checkpointer` and `JobStore.checkpoint`: SQLite's log copied back apart from commits."""

from __future__ import annotations

import threading

from mlflow_dock.jobs.checkpoint import Checkpointer
from mlflow_dock.jobs.model import JobKind
from mlflow_dock.store.deliveries import DeliveryRequest
from mlflow_dock.store.facade import JobStore


def test_checkpoints_run_until_stopped_and_a_failure_is_not_fatal():
    calls: list[int] = []
    third = threading.Event()

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk busy")
        if len(calls) >= 3:
            third.set()

    checkpointer = Checkpointer(checkpoint, interval_seconds=0.01)
    checkpointer.start()
    assert third.wait(5)
    checkpointer.stop()
    stopped_at = len(calls)
    third.clear()
    assert not third.wait(0.1) and len(calls) == stopped_at


def test_a_checkpoint_copies_the_log_into_the_database_file(tmp_path):
    db = tmp_path / "jobs.db"
    store = JobStore.from_url(f"sqlite:///{db}")
    before = db.stat().st_size
    store.accept_deliveries(
        [DeliveryRequest(f"d{i}", JobKind.BUILD, "m", str(i + 1)) for i in range(300)]
    )
    assert db.stat().st_size == before  # committed to the log only
    store.checkpoint()
    assert db.stat().st_size > before
    assert store.job_for_delivery("d299") is not None
    store.close()


def test_checkpoint_is_harmless_on_every_store(store):
    store.request_build("m", "1", delivery_id="d1")
    store.checkpoint()
    assert store.job_for_delivery("d1") is not None
