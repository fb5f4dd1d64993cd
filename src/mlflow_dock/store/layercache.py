"""The native builder's layer-digest cache, as rows of the `native_layers` table.

Implements `imaging.layercache.LayerCache` on the shared database: which blob a package
group's layer became, and the repository it was last pushed to (see imaging/layercache.py).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mlflow_dock.imaging.layercache import CachedLayer
from mlflow_dock.store.database import Part
from mlflow_dock.store.schema import LayerRow


class StoredLayerCache(Part):
    def get(self, host: str, key: str) -> CachedLayer | None:
        with self._db.read() as session:
            row = session.execute(
                select(LayerRow).where(LayerRow.host == host, LayerRow.key == key)
            ).scalar_one_or_none()
            if row is None:
                return None
            return CachedLayer(row.digest, row.diff_id, row.size, row.repository)

    def put(self, host: str, key: str, layer: CachedLayer, *, label: str) -> None:
        # Two workers that built the same layer at once both find no row and insert: the
        # loser's INSERT hits the primary key, and merging again updates the winner's row.
        for attempt in range(2):
            try:
                with self._db.write() as session:
                    session.merge(
                        LayerRow(
                            host=host,
                            key=key,
                            digest=layer.digest,
                            diff_id=layer.diff_id,
                            size=layer.size,
                            repository=layer.repository,
                            label=label[:1024],
                            updated=datetime.now(UTC),
                        )
                    )
                return
            except IntegrityError:
                if attempt:
                    raise
