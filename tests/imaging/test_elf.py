"""The minimal ELF reader: machine and DT_NEEDED of real shared objects, None for the rest."""

from __future__ import annotations

import platform
import sys
import tracemalloc
from pathlib import Path

import numpy

from mlflow_dock.imaging.elf import parse_elf, read_elf
from support.elffiles import tiny_elf64


def _extension() -> Path:
    return next(Path(numpy.__file__).parent.rglob("*.cpython-*.so"))


def test_reads_machine_and_needed_of_a_real_extension():
    info = read_elf(_extension())
    assert info is not None
    assert info.machine == platform.machine()
    assert "libc.so.6" in info.needed or any(n.startswith("libpython") for n in info.needed)


def test_soname_of_a_vendored_library():
    libs = list((Path(numpy.__file__).parent.parent / "numpy.libs").glob("*.so*"))
    info = read_elf(libs[0]) if libs else read_elf(Path(sys.executable).resolve())
    assert info is not None
    if libs:
        assert info.soname == libs[0].name


def test_not_elf_and_truncated_give_none(tmp_path: Path):
    text = tmp_path / "x.so"
    text.write_text("not an elf")
    assert read_elf(text) is None
    assert read_elf(tmp_path / "missing.so") is None
    assert parse_elf(b"\x7fELF" + b"\x02\x01" + b"\0" * 10) is None


def test_aarch64_and_needed_from_a_crafted_file():
    info = parse_elf(tiny_elf64(183, ["libgomp.so.1", "libc.so.6"]))
    assert info is not None
    assert info.machine == "aarch64"
    assert info.needed == ("libgomp.so.1", "libc.so.6")


def test_only_the_headers_and_the_dynamic_section_are_read(tmp_path: Path):
    path = tmp_path / "libhuge.so"
    path.write_bytes(tiny_elf64(62, ["libcuda.so.1"]))
    with path.open("r+b") as file:
        file.truncate(4 << 30)  # sparse: 4 GiB after the tables, as big CUDA libraries are
    tracemalloc.start()
    try:
        info = read_elf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info is not None and info.needed == ("libcuda.so.1",)
    assert peak < 1 << 20
