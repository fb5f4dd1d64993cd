"""The store's own memory, in the key-value `meta` table: runtime images, when watching began."""

from __future__ import annotations

import hashlib
from datetime import datetime

from mlflow_dock.store.database import Part
from mlflow_dock.store.records import utcnow
from mlflow_dock.store.schema import MetaRow


def _runtime_meta_key(key: str, repository: str) -> str:
    # Meta keys are short (100); runtime keys and repositories are not.
    return "runtime:" + hashlib.sha256(f"{key}\0{repository}".encode()).hexdigest()


class RuntimeMemory(Part):
    def runtime_image(self, key: str, repository: str) -> str | None:
        """The digest of an image of runtime `key` in `repository` (see remember_runtime_image)."""
        with self._db.read() as session:
            row = session.get(MetaRow, _runtime_meta_key(key, repository))
            return row.value if row else None

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None:
        """Recorded by the build that made it, before it lets go of the runtime's lock.

        Builds waiting for that lock read it to assemble on the new image at once: the job
        that built it may not have recorded its own outcome yet.
        """
        with self._db.write() as session:
            session.merge(MetaRow(key=_runtime_meta_key(key, repository), value=digest))

    def watch_since(self) -> datetime:
        """When this store first started watching MLflow (set once, on first call)."""
        with self._db.write() as session:
            row = session.get(MetaRow, "watch_since")
            if row is None:
                row = MetaRow(key="watch_since", value=utcnow().isoformat())
                session.add(row)
            return datetime.fromisoformat(row.value)
