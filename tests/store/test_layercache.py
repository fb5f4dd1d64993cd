"""The native builder's layer cache, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session

from mlflow_dock.imaging.layercache import CachedLayer
from mlflow_dock.store.database import Database
from mlflow_dock.store.layercache import StoredLayerCache
from mlflow_dock.store.migrate import upgrade
from mlflow_dock.store.schema import LayerRow
from support.databases import database

LAYER = CachedLayer(
    digest="sha256:" + "a" * 64, diff_id="sha256:" + "b" * 64, size=3, repository="r"
)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_workers_caching_the_same_layer_at_once_both_succeed(kind, tmp_path, monkeypatch):
    """The other worker's row appears between this worker's lookup and its INSERT."""
    with database(kind, tmp_path) as url:
        db = Database.from_url(url)
        upgrade(db)
        engine = db.engine
        cache = StoredLayerCache(db)
        merge = Session.merge
        raced: list[bool] = []

        def merge_while_another_worker_inserts(session, instance, **kwargs):
            merged = merge(session, instance, **kwargs)  # looked up: no row yet
            if not raced:
                raced.append(True)
                with engine.begin() as other:
                    other.execute(
                        insert(LayerRow.__table__).values(
                            host="h",
                            key="k",
                            digest=LAYER.digest,
                            diff_id=LAYER.diff_id,
                            size=1,
                            repository="elsewhere",
                            label="x",
                            updated=datetime.now(UTC),
                        )
                    )
            return merged

        monkeypatch.setattr(Session, "merge", merge_while_another_worker_inserts)
        cache.put("h", "k", LAYER, label="numpy==2.0")
        monkeypatch.undo()
        assert raced and cache.get("h", "k") == LAYER
        db.close()


def test_a_layer_is_found_per_registry_host_and_key(store):
    cache = StoredLayerCache(store.database)
    assert cache.get("h", "k") is None
    cache.put("h", "k", LAYER, label="x" * 2000)  # labels are cut to fit
    assert cache.get("h", "k") == LAYER
    assert cache.get("other-host", "k") is None
    moved = CachedLayer(LAYER.digest, LAYER.diff_id, LAYER.size, "r2")
    cache.put("h", "k", moved, label="numpy==2.0")
    assert cache.get("h", "k") == moved
