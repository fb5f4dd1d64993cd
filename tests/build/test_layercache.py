"""The native builder's layer cache, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, insert
from sqlalchemy.orm import Session

from mlflow_dock.build.layercache import CachedLayer, LayerCache, _LayerRow
from support.databases import database

LAYER = CachedLayer(
    digest="sha256:" + "a" * 64, diff_id="sha256:" + "b" * 64, size=3, repository="r"
)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_workers_caching_the_same_layer_at_once_both_succeed(kind, tmp_path, monkeypatch):
    """The other worker's row appears between this worker's lookup and its INSERT."""
    with database(kind, tmp_path) as url:
        engine = create_engine(url)
        cache = LayerCache(engine)
        merge = Session.merge
        raced: list[bool] = []

        def merge_while_another_worker_inserts(session, instance, **kwargs):
            merged = merge(session, instance, **kwargs)  # looked up: no row yet
            if not raced:
                raced.append(True)
                with engine.begin() as other:
                    other.execute(
                        insert(_LayerRow.__table__).values(
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
        engine.dispose()
