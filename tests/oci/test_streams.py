"""SizedReader: positions for streams that never hold their bytes."""

from __future__ import annotations

import io

from mlflow_dock.oci.streams import SizedReader


class Counting(SizedReader):
    """Bytes 0..size-1 (mod 256), and the positions it was moved to."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.moves: list[int] = []

    def _moved(self, position: int) -> None:
        self.moves.append(position)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.size - self._position)
        view = memoryview(buffer)
        for i in range(count):
            view[i] = (self._position + i) % 256
        self._position += count
        return count


def test_seek_from_each_end_clamps_at_zero_and_reads_from_there() -> None:
    reader = Counting(10)
    assert (reader.readable(), reader.seekable()) == (True, True)
    assert reader.seek(-3, io.SEEK_END) == 7
    assert reader.read() == bytes([7, 8, 9])
    assert reader.seek(-100, io.SEEK_CUR) == 0
    assert reader.seek(4) == 4 and reader.tell() == 4
    assert reader.read(2) == bytes([4, 5])


def test_the_hook_sees_only_real_moves() -> None:
    reader = Counting(10)
    reader.seek(0)
    reader.read(3)
    reader.seek(3)  # where the reads left it: no move
    reader.seek(1)
    assert reader.moves == [1]
