"""The little of ELF the native builder needs: a shared object's machine and DT_NEEDED list.

Why hand-written: pyelftools (the well-kept choice) is not among the locked dependencies and
the rules of this checkout forbid adding one now; what is needed here is ~80 lines of
``struct`` over the ELF header, the section headers and one dynamic section, all fixed by the
System V ABI. Anything unexpected makes :func:`read_elf` return None (not an ELF we can read),
never raise: the caller then simply does not know that file's needs.

A file is never read whole (CUDA and MKL libraries run to hundreds of MB): only the ELF header,
the section header table, the dynamic section and the string table it links to are read, each
where the headers say it is.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["MACHINES", "ElfInfo", "parse_elf", "read_elf"]

_MAGIC: Final = b"\x7fELF"
_SHT_DYNAMIC: Final = 6
_DT_NULL: Final = 0
_DT_NEEDED: Final = 1
_DT_SONAME: Final = 14
# e_machine values (ELF gABI) for the platforms images are built for.
MACHINES: Final = {3: "i386", 62: "x86_64", 183: "aarch64", 40: "arm", 21: "ppc64", 22: "s390x"}
# A section header table or dynamic string table larger than this is not a library's.
_MAX_TABLE: Final = 16 << 20

# (offset, length) -> the bytes there; fewer at the end of the file.
ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class ElfInfo:
    machine: str  # "x86_64", "aarch64", ... or "unknown-<n>"
    needed: tuple[str, ...]  # DT_NEEDED sonames, in file order
    soname: str | None


def _parse(read_at: ReadAt) -> ElfInfo | None:
    header = read_at(0, 64)
    if len(header) < 64 or header[:4] != _MAGIC:
        return None
    is64 = header[4] == 2
    endian = "<" if header[5] == 1 else ">"
    try:
        (e_machine,) = struct.unpack_from(endian + "H", header, 18)
        if is64:
            (e_shoff,) = struct.unpack_from(endian + "Q", header, 40)
            e_shentsize, e_shnum = struct.unpack_from(endian + "HH", header, 58)
            section = endian + "IIQQQQIIQQ"
        else:
            (e_shoff,) = struct.unpack_from(endian + "I", header, 32)
            e_shentsize, e_shnum = struct.unpack_from(endian + "HH", header, 46)
            section = endian + "IIIIIIIIII"
        machine = MACHINES.get(e_machine, f"unknown-{e_machine}")
        if e_shentsize * e_shnum > _MAX_TABLE:
            return None
        table = read_at(e_shoff, e_shentsize * e_shnum)
        sections = [struct.unpack_from(section, table, i * e_shentsize) for i in range(e_shnum)]
        needed: list[str] = []
        soname: str | None = None
        for sh in sections:
            # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
            if sh[1] != _SHT_DYNAMIC:
                continue
            strtab = sections[sh[6]]
            if strtab[5] > _MAX_TABLE or sh[5] > _MAX_TABLE:
                return None
            strings = read_at(strtab[4], strtab[5])
            dynamic = read_at(sh[4], sh[5])
            entry = endian + ("qQ" if is64 else "iI")
            step = struct.calcsize(entry)
            for pos in range(0, len(dynamic) - step + 1, step):
                tag, value = struct.unpack_from(entry, dynamic, pos)
                if tag == _DT_NULL:
                    break
                if tag in (_DT_NEEDED, _DT_SONAME) and value < len(strings):
                    name = strings[value : strings.index(b"\0", value)].decode("utf-8", "replace")
                    if tag == _DT_NEEDED:
                        needed.append(name)
                    else:
                        soname = name
        return ElfInfo(machine=machine, needed=tuple(needed), soname=soname)
    except (struct.error, IndexError, ValueError):
        return None


def parse_elf(data: bytes) -> ElfInfo | None:
    """Machine, DT_NEEDED and DT_SONAME of an ELF image in ``data``; None if it is not one."""
    return _parse(lambda offset, length: data[offset : offset + length])


def read_elf(path: Path) -> ElfInfo | None:
    """:func:`parse_elf` of a file, reading only its headers and dynamic section; None for
    non-ELF files (checked from the first 4 bytes)."""
    try:
        with path.open("rb") as file:
            if file.read(4) != _MAGIC:
                return None

            def read_at(offset: int, length: int) -> bytes:
                file.seek(offset)
                return file.read(length)

            return _parse(read_at)
    except OSError:
        return None
