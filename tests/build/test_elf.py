"""The minimal ELF reader: machine and DT_NEEDED of real shared objects, None for the rest."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy

from mlflow_dock.build.elf import parse_elf, read_elf
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
