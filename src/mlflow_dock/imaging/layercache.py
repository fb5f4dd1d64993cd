"""Layer caches: which blob a layer's content became, and where it is, in two levels.

Tarring and compressing numpy or torch again costs seconds to minutes, and uploading it again
as long. A layer is identified by its content key (``layers.content_key``: every file's bytes,
mode and link target, the layout and the codec), and a known key is neither re-packed nor
re-uploaded: the builder mounts the blob into the target repository from wherever it is.

* First level, :class:`LayerCache`: this deployment's own memory, in the job store's database
  (``mlflow_dock.store.layercache.StoredLayerCache``, table ``native_layers``).
* Second level, ``registrycache.SharedLayers``: the registry itself, where every worker that ever
  pushed a layer left one small manifest per content key in a repository of the service's own
  (``imaging/registrycache.py``). A fresh worker, a new pod with its own SQLite, or a new
  installation on the same registry finds there what any other pushed.

The builder depends on the protocols only; app.py wires the implementations. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "CachedLayer",
    "LayerCache",
    "NoLayerCache",
]


@dataclass(frozen=True)
class CachedLayer:
    digest: str
    diff_id: str
    size: int
    repository: str  # where the blob was last seen, to mount from


class LayerCache(Protocol):
    def get(self, host: str, key: str) -> CachedLayer | None: ...

    def put(self, host: str, key: str, layer: CachedLayer, *, label: str) -> None: ...


class NoLayerCache:
    """Remembers nothing (a one-off build in tests)."""

    def get(self, host: str, key: str) -> CachedLayer | None:
        return None

    def put(self, host: str, key: str, layer: CachedLayer, *, label: str) -> None:
        return None
