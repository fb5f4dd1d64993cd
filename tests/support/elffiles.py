"""Crafted ELF files for tests of the native builder's library checks."""

from __future__ import annotations

import struct


def tiny_elf64(machine: int, needed: list[str]) -> bytes:
    """An ELF64 LE with a .dynstr and a .dynamic section, nothing else."""
    strtab = b"\0" + b"".join(name.encode() + b"\0" for name in needed)
    offsets, pos = [], 1
    for name in needed:
        offsets.append(pos)
        pos += len(name) + 1
    dynamic = b"".join(struct.pack("<qQ", 1, off) for off in offsets) + struct.pack("<qQ", 0, 0)
    header_size = 64
    strtab_off = header_size
    dynamic_off = strtab_off + len(strtab)
    shoff = dynamic_off + len(dynamic)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, machine)
    struct.pack_into("<Q", header, 40, shoff)
    struct.pack_into("<HH", header, 58, 64, 3)
    null = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    strsec = struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, strtab_off, len(strtab), 0, 0, 1, 0)
    dynsec = struct.pack("<IIQQQQIIQQ", 0, 6, 0, 0, dynamic_off, len(dynamic), 1, 0, 8, 16)
    return bytes(header) + strtab + dynamic + null + strsec + dynsec
