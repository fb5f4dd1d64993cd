"""The MLflow tag outbox: newest value wins, nothing written twice, nothing lost."""

from __future__ import annotations

from mlflow_dock.store.facade import JobStore


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


def test_recording_a_pending_value_again_writes_it_once(store):
    store.record_tag_writes("m", "1", {"s": "succeeded"})
    (write,) = store.pending_tag_writes()
    store.record_tag_writes("m", "1", {"s": "succeeded"})  # the change hook after the outcome
    store.tag_write_done(write)
    assert store.pending_tag_writes() == []


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
