"""A read-only stream of known size that can be positioned anywhere: the shape shared by a
layer produced on the fly (:class:`~mlflow_dock.oci.mutate.FileLayer`) and a registry blob
read through HTTP ranges (:class:`~mlflow_dock.oci.remote.BlobReader`).

Hand-written rather than :class:`io.BytesIO` or a file because neither stream ever holds its
bytes: subclasses produce them in ``readinto`` from wherever ``_position`` says.
"""

from __future__ import annotations

import io


class SizedReader(io.RawIOBase):
    """``size`` bytes; ``seek`` moves ``_position`` through :meth:`_moved` (a hook)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        position = max(0, base + offset)
        if position != self._position:
            self._moved(position)
        self._position = position
        return position

    def _moved(self, position: int) -> None:
        """Called before the position changes to ``position``; nothing by default."""
