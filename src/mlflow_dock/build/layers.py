"""Deterministic image layers: the same files give the same bytes, so the same digest.

A layer blob's digest is what lets a registry store a package once for every image of every
model. Everything that could differ between two builds of the same files is fixed:

* entries sorted by name, parent directories written explicitly;
* owner from the caller (0:0 for the runtime, 10001 only for the home directory), no user or
  group names, time ``SOURCE_DATE_EPOCH`` (0 unless set), PAX format;
* mode from the file, normalised to 0755 (directories and executables) or 0644, so a restrictive
  umask on the worker does not leak into images;
* gzip header without file name and with time 0, a fixed compression level.

Installed files are hard links into uv's cache, so owner, mode and time are set in the tar
headers only, never on disk.

Grouping (one layer per installed distribution, see :func:`group_distributions`) is chosen so
that a layer's content depends on one distribution only: two models that install the same
numpy build share numpy's layer even if everything else differs.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Final, cast

from mlflow_dock.build.wheels import Distribution
from mlflow_dock.oci.mutate import HashingWriter, LayerDigests

__all__ = [
    "DIR",
    "FILE",
    "SYMLINK",
    "Entry",
    "LayerDigests",
    "PackageGroup",
    "VenvLayout",
    "distribution_entries",
    "group_distributions",
    "source_date_epoch",
    "write_layer",
]

FILE: Final = "file"
DIR: Final = "dir"
SYMLINK: Final = "symlink"
# Go's default, as the engine uses. Level 1 would halve the time of a cold first build and
# grow blobs ~15 %; every later build reuses blobs by digest, so size wins.
GZIP_LEVEL: Final = 6
# Bumped whenever the bytes this module writes for the same input change, so the layer-digest
# cache never hands out a digest of an older format.
LAYOUT_VERSION: Final = "1"
# Runtimes refuse images beyond ~127 layers (overlayfs' stacking limit, containerd's and
# Docker's checks); images stay at most IMAGE_LAYER_BUDGET layers in all, base included, and
# never use more than MAX_PACKAGE_LAYERS for packages.
IMAGE_LAYER_BUDGET: Final = 110
MAX_PACKAGE_LAYERS: Final = 100
# When a requirements set has more distributions than that, the largest keep their own layer
# and the small ones share a few buckets chosen by a hash of their name.
SMALL_PACKAGE_BUCKETS: Final = 16


def source_date_epoch() -> int:
    """The time written into every entry: ``SOURCE_DATE_EPOCH`` if set (reproducible builds)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.isdigit() else 0


@dataclass(frozen=True)
class Entry:
    """One tar entry: ``name`` without leading slash; content from ``source`` or ``data``."""

    name: str
    kind: str = FILE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    source: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    linkname: str = ""


def _with_parents(entries: Iterable[Entry]) -> list[Entry]:
    by_name: dict[str, Entry] = {}
    for entry in entries:
        name = entry.name.strip("/")
        by_name[name] = entry
        parent = PurePosixPath(name).parent
        while str(parent) not in (".", "") and str(parent) not in by_name:
            by_name[str(parent)] = Entry(str(parent), kind=DIR, mode=0o755)
            parent = parent.parent
    return [by_name[name] for name in sorted(by_name)]


def write_layer(
    entries: Iterable[Entry],
    out: IO[bytes],
    *,
    mtime: int | None = None,
    level: int = GZIP_LEVEL,
) -> LayerDigests:
    """Write ``entries`` (parents added, sorted) as a gzip tar layer into ``out``."""
    when = source_date_epoch() if mtime is None else mtime
    compressed = HashingWriter(out)
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=compressed, compresslevel=level, mtime=0
    ) as gz:
        uncompressed = HashingWriter(gz)
        stream = cast(IO[bytes], uncompressed)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for entry in _with_parents(entries):
                info = tarfile.TarInfo(entry.name.strip("/"))
                info.uid, info.gid = entry.uid, entry.gid
                info.uname = info.gname = ""
                info.mtime = when
                info.mode = entry.mode
                if entry.kind == DIR:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == SYMLINK:
                    info.type = tarfile.SYMTYPE
                    info.mode = 0o777
                    info.linkname = entry.linkname
                    tar.addfile(info)
                elif entry.data is not None:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
                else:
                    assert entry.source is not None
                    with entry.source.open("rb") as file:
                        info.size = os.fstat(file.fileno()).st_size
                        tar.addfile(info, file)
    return LayerDigests(
        digest=compressed.digest(), diff_id=uncompressed.digest(), size=compressed.size
    )


# --------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class VenvLayout:
    """Where an installed tree goes in the image's virtualenv."""

    venv: str  # "/opt/mlflow-dock/venv"
    python_version: str  # "3.11"

    @property
    def site_packages(self) -> str:
        return f"{self.venv}/lib/python{self.python_version}/site-packages"

    @property
    def bin_dir(self) -> str:
        return f"{self.venv}/bin"

    @property
    def python(self) -> str:
        return f"{self.bin_dir}/python"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _rewrite_script(data: bytes, python: str) -> bytes:
    """A console script written by ``--target`` names the worker's Python in its shebang."""
    if not data.startswith(b"#!"):
        return data
    first, sep, rest = data.partition(b"\n")
    if b"python" not in first:
        return data
    return f"#!{python}".encode() + sep + rest


def _mode(path: Path) -> tuple[str, int]:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return SYMLINK, 0o777
    if stat.S_ISDIR(info.st_mode):
        return DIR, 0o755
    return FILE, 0o755 if info.st_mode & 0o111 else 0o644


def distribution_entries(
    dist: Distribution, target_dir: Path, layout: VenvLayout
) -> Iterator[Entry]:
    """The entries of one installed distribution placed into the image's virtualenv.

    Scripts move to the virtualenv's ``bin`` with their shebang pointing at its Python, and
    RECORD is rewritten to match (new hashes, paths relative to site-packages as an install
    into the virtualenv writes them), so the layer does not depend on the worker's Python.
    ``REQUESTED`` is dropped: it only says whether the package was named in requirements.txt,
    which would make the same package's layer differ between models.
    """
    site = layout.site_packages.lstrip("/")
    bindir = layout.bin_dir.lstrip("/")
    up = "/".join(".." for _ in PurePosixPath(layout.site_packages).relative_to(layout.venv).parts)
    rewritten: dict[str, tuple[str, bytes]] = {}
    record_name = f"{dist.dist_info}/RECORD"
    requested = f"{dist.dist_info}/REQUESTED"
    for relative in dist.files:
        if relative in (record_name, requested):
            continue
        path = target_dir / relative
        kind, mode = _mode(path)
        if relative.startswith("bin/"):
            name = f"{bindir}/{relative[4:]}"
            if kind == FILE:
                data = _rewrite_script(path.read_bytes(), layout.python)
                rewritten[relative] = (f"{up}/{relative}", data)
                yield Entry(name, kind=FILE, mode=0o755, data=data)
                continue
        else:
            name = f"{site}/{relative}"
        if kind == SYMLINK:
            yield Entry(name, kind=SYMLINK, linkname=os.readlink(path))
        elif kind == FILE:
            yield Entry(name, kind=FILE, mode=mode, source=path)
    yield Entry(f"{site}/{record_name}", data=_rewrite_record(dist, rewritten, requested))


def _rewrite_record(
    dist: Distribution, rewritten: dict[str, tuple[str, bytes]], drop: str
) -> bytes:
    rows = list(csv.reader(io.StringIO(dist.record.decode("utf-8", "replace"))))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        if not row or row[0] == drop:
            continue
        if row[0] in rewritten:
            path, data = rewritten[row[0]]
            row = [path, _record_hash(data), str(len(data))]
        writer.writerow(row)
    return out.getvalue().encode()


@dataclass(frozen=True)
class PackageGroup:
    """Distributions that go into one layer; ``key`` identifies its bytes for the cache."""

    distributions: tuple[Distribution, ...]
    key: str

    @property
    def label(self) -> str:
        return ", ".join(f"{d.name}=={d.version}" for d in self.distributions)


def layer_key(dists: Sequence[Distribution], layout: VenvLayout, level: int = GZIP_LEVEL) -> str:
    """What a group's layer bytes depend on: format, placement, and every file's hash."""
    digest = hashlib.sha256()
    for part in (LAYOUT_VERSION, layout.venv, layout.python_version, str(level)):
        digest.update(part.encode() + b"\0")
    for dist in sorted(dists, key=lambda d: d.dist_info):
        digest.update(dist.dist_info.encode() + b"\0" + dist.record + b"\0")
    return digest.hexdigest()


def group_distributions(
    dists: Sequence[Distribution],
    sizes: dict[str, int],
    layout: VenvLayout,
    *,
    max_layers: int = MAX_PACKAGE_LAYERS,
    buckets: int = SMALL_PACKAGE_BUCKETS,
) -> list[PackageGroup]:
    """One group per distribution, unless there are more than ``max_layers``.

    Then the ``max_layers - buckets`` largest (by installed bytes, ``sizes`` keyed by
    dist_info) keep their own layer and the rest share ``buckets`` layers picked by a hash of
    the distribution's name: a small package always lands in the same bucket, so buckets of
    models with the same small packages still match.
    """
    ordered = sorted(dists, key=lambda d: d.dist_info)
    if len(ordered) <= max_layers:
        return [PackageGroup((d,), layer_key([d], layout)) for d in ordered]
    by_size = sorted(ordered, key=lambda d: (-sizes.get(d.dist_info, 0), d.dist_info))
    own = by_size[: max_layers - buckets]
    shared: dict[int, list[Distribution]] = {}
    for dist in by_size[max_layers - buckets :]:
        bucket = int(hashlib.sha256(dist.name.encode()).hexdigest(), 16) % buckets
        shared.setdefault(bucket, []).append(dist)
    groups = [PackageGroup((d,), layer_key([d], layout)) for d in own]
    for bucket in sorted(shared):
        members = tuple(sorted(shared[bucket], key=lambda d: d.dist_info))
        groups.append(PackageGroup(members, layer_key(members, layout)))
    return sorted(groups, key=lambda g: g.distributions[0].dist_info)


def package_layer_budget(base_layers: int) -> int:
    """How many package layers an image on a base with ``base_layers`` layers may have."""
    # Two more layers: the virtualenv and the model.
    return max(
        SMALL_PACKAGE_BUCKETS + 1, min(MAX_PACKAGE_LAYERS, IMAGE_LAYER_BUDGET - base_layers - 2)
    )


def installed_size(dist: Distribution, target_dir: Path) -> int:
    total = 0
    for relative in dist.files:
        try:
            total += (target_dir / relative).lstat().st_size
        except OSError:
            continue
    return total
