"""Deterministic image layers: the same files give the same bytes, so the same digest.

A layer blob's digest is what lets a registry store a package once for every image of every
model. Everything that could differ between two builds of the same files is fixed:

* entries sorted by name, parent directories written explicitly;
* owner from the caller (0:0 for the runtime, 10001 only for the home directory), no user or
  group names, time ``SOURCE_DATE_EPOCH`` (0 unless set), PAX format;
* mode from the file, normalised to 0755 (directories and executables) or 0644, so a restrictive
  umask on the worker does not leak into images;
* the compressed stream: gzip without file name and with time 0 at a fixed level, or zstd at a
  fixed level without a content size or checksum (the :class:`LayerCodec` chosen in app.py).

Installed files are hard links into uv's cache, so owner, mode and time are set in the tar
headers only, never on disk.

Grouping (one layer per installed distribution, see :func:`group_distributions`) is chosen so
that a layer's content depends on one distribution only: two models that install the same
numpy build share numpy's layer even if everything else differs.

A packed layer is reused by its :func:`content_key`: a hash of every entry exactly as the layer
writes it (name, kind, mode, owner, link target, and the sha256 of each file's bytes as they are
on disk), the layout version, the time and the codec. Two installs share a layer only if they
wrote the same bytes, whatever their RECORD files claim.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Final, Protocol, cast

import zstandard

from mlflow_dock.imaging.wheels import Distribution
from mlflow_dock.oci.manifest import OCI_LAYER
from mlflow_dock.oci.mutate import HashingWriter, LayerDigests

__all__ = [
    "DIR",
    "FILE",
    "OCI_LAYER_ZSTD",
    "SYMLINK",
    "Entry",
    "FileDigests",
    "Gzip",
    "LayerCodec",
    "LayerDigests",
    "PackageGroup",
    "VenvLayout",
    "Zstd",
    "codec_named",
    "content_key",
    "distribution_entries",
    "group_distributions",
    "source_date_epoch",
    "write_layer",
]

FILE: Final = "file"
DIR: Final = "dir"
SYMLINK: Final = "symlink"
OCI_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
# Measured on the installed files of an MLflow scikit-learn model (bench/layer_codecs.py, 89
# packages, 642 MB; docs/builders.md): gzip level 1 packs in a third of level 6's time for
# blobs 15 % larger.
# Packing happens once per package build and registry (the registry's layer cache hands the
# blob to every later worker), pulls decompress either at the same speed.
GZIP_LEVEL: Final = 1
# zstd's own default: faster than gzip level 1 and smaller than gzip level 6 (same figures).
ZSTD_LEVEL: Final = 3
# Bumped whenever the bytes this module writes for the same input change, so the layer-digest
# cache never hands out a digest of an older format.
LAYOUT_VERSION: Final = "1"
# Bumped whenever content_key hashes something else, so old keys are never matched.
KEY_FORMAT: Final = "mlflow-dock layer content key 1"
# Runtimes refuse images beyond ~127 layers (overlayfs' stacking limit, containerd's and
# Docker's checks); images stay at most IMAGE_LAYER_BUDGET layers in all, base included, and
# never use more than MAX_PACKAGE_LAYERS for packages.
IMAGE_LAYER_BUDGET: Final = 110
MAX_PACKAGE_LAYERS: Final = 100
# When a requirements set has more distributions than that, the largest keep their own layer
# and the small ones share a few buckets chosen by a hash of their name.
SMALL_PACKAGE_BUCKETS: Final = 16
# Bytes tarfile copies per write: large writes hand the GIL over less often, so compressors
# (which release it) in several threads pack layers in parallel. The bytes written are the same.
_COPY_BUFFER: Final = 1 << 20


def source_date_epoch() -> int:
    """The time written into every entry: ``SOURCE_DATE_EPOCH`` if set (reproducible builds)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.isdigit() else 0


# --------------------------------------------------------------------------- codecs


class LayerCodec(Protocol):
    """How layer tars are compressed; one is chosen in app.py (MLFLOW_DOCK_LAYER_COMPRESSION)."""

    @property
    def name(self) -> str:
        """``gzip`` or ``zstd``: part of every cache key, since clients read only some codecs."""
        ...

    @property
    def media_type(self) -> str: ...

    def compressor(self, out: IO[bytes]) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A stream that compresses into ``out``; leaving it ends the compressed stream."""
        ...


@dataclass(frozen=True)
class Gzip:
    """Read by every client."""

    level: int = GZIP_LEVEL

    @property
    def name(self) -> str:
        return "gzip"

    @property
    def media_type(self) -> str:
        return OCI_LAYER

    @contextlib.contextmanager
    def compressor(self, out: IO[bytes]) -> Iterator[IO[bytes]]:
        # filename="" keeps the name out of the header; mtime=0 keeps the time out.
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=out, compresslevel=self.level, mtime=0
        ) as stream:
            yield cast(IO[bytes], stream)


@dataclass(frozen=True)
class Zstd:
    """Read by containerd >= 1.5, Docker Engine >= 23.0, Podman and CRI-O; not Docker 20.10."""

    level: int = ZSTD_LEVEL

    @property
    def name(self) -> str:
        return "zstd"

    @property
    def media_type(self) -> str:
        return OCI_LAYER_ZSTD

    @contextlib.contextmanager
    def compressor(self, out: IO[bytes]) -> Iterator[IO[bytes]]:
        # One thread per layer (layers are packed in parallel instead), no checksum and no
        # content size in the frame header: the bytes depend on the input and level only.
        context = zstandard.ZstdCompressor(level=self.level, write_checksum=False)
        with context.stream_writer(out, closefd=False) as stream:
            yield cast(IO[bytes], stream)


def codec_named(name: str) -> LayerCodec:
    """``gzip`` or ``zstd`` at the measured default level (settings validate the name)."""
    if name == "zstd":
        return Zstd()
    if name == "gzip":
        return Gzip()
    raise ValueError(f"unknown layer compression {name!r}: expected gzip or zstd")


DEFAULT_CODEC: Final = Gzip()


# --------------------------------------------------------------------------- entries


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
        # String operations, not PurePosixPath: this runs for every file of every build.
        parent = name.rpartition("/")[0]
        while parent and parent not in by_name:
            by_name[parent] = Entry(parent, kind=DIR, mode=0o755)
            parent = parent.rpartition("/")[0]
    return [by_name[name] for name in sorted(by_name)]


def write_layer(
    entries: Iterable[Entry],
    out: IO[bytes],
    *,
    mtime: int | None = None,
    codec: LayerCodec = DEFAULT_CODEC,
) -> LayerDigests:
    """Write ``entries`` (parents added, sorted) as a compressed tar layer into ``out``."""
    when = source_date_epoch() if mtime is None else mtime
    compressed = HashingWriter(out)
    with codec.compressor(cast(IO[bytes], compressed)) as sink:
        uncompressed = HashingWriter(sink)
        stream = cast(IO[bytes], uncompressed)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = _COPY_BUFFER  # type: ignore[attr-defined]  # typeshed lacks it
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


# --------------------------------------------------------------------------- content keys


class FileDigests:
    """The sha256 of files' bytes, remembered per (device, inode, size, mtime in ns).

    uv installs hard links into its cache, so the same numpy file keeps its inode from one
    build to the next, and a worker reads each installed file once, not on every build. (Not
    the ctime: every new hard link changes it.) Writing a file sets its mtime to the kernel's
    clock tick (a few milliseconds, in nanoseconds); only mtimes with a fraction of a second
    are trusted, so a time copied from an archive (whole or even seconds) never stands for
    content, and an inode reused for another file would need the same size within the same
    tick. Only this worker's uv writes these files; whoever else could write them could change
    the images anyway. Bounded: past ``capacity`` files the oldest half is forgotten.
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self._capacity = capacity
        self._known: dict[tuple[int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        with self._lock:
            known = self._known.get(_signature(os.stat(path)))
        if known is not None:
            return known
        with path.open("rb") as file:
            signature = _signature(os.fstat(file.fileno()))
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        if signature[3] % 1_000_000_000:
            with self._lock:
                if len(self._known) >= self._capacity:
                    for old in list(self._known)[: self._capacity // 2]:
                        del self._known[old]
                self._known[signature] = digest
        return digest


def _signature(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def content_key(
    entries: Iterable[Entry],
    *,
    codec: LayerCodec,
    digests: FileDigests,
    mtime: int | None = None,
) -> str:
    """What the layer :func:`write_layer` makes of ``entries`` contains, as 64 hex digits.

    Every entry as it is written (after parents are added and names sorted): name, kind, mode,
    owner, link target, and for files the sha256 of the bytes on disk, not of what an
    installer's RECORD says they are. Plus the layout version, the entries' time and the codec
    (a cached blob is reused only where the same clients can read it). The compression level is
    left out: any level decompresses to the same tar.
    """
    when = source_date_epoch() if mtime is None else mtime
    key = hashlib.sha256()
    key.update(json.dumps([KEY_FORMAT, LAYOUT_VERSION, codec.name, when]).encode() + b"\n")
    for entry in _with_parents(entries):
        mode = 0o777 if entry.kind == SYMLINK else entry.mode
        content = ""
        if entry.kind == FILE:
            if entry.data is not None:
                content = hashlib.sha256(entry.data).hexdigest()
            else:
                assert entry.source is not None
                content = digests.sha256(entry.source)
        # JSON escapes every character that could make two entries run into each other.
        record = [entry.name.strip("/"), entry.kind, mode, entry.uid, entry.gid]
        record += [entry.linkname if entry.kind == SYMLINK else "", content]
        key.update(json.dumps(record).encode() + b"\n")
    return key.hexdigest()


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
    """Distributions that go into one layer (its cache key is :func:`content_key` of it)."""

    distributions: tuple[Distribution, ...]

    @property
    def label(self) -> str:
        return ", ".join(f"{d.name}=={d.version}" for d in self.distributions)

    def entries(self, target_dir: Path, layout: VenvLayout) -> list[Entry]:
        found: list[Entry] = []
        for dist in self.distributions:
            found.extend(distribution_entries(dist, target_dir, layout))
        return found


def group_distributions(
    dists: Sequence[Distribution],
    sizes: dict[str, int],
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
        return [PackageGroup((d,)) for d in ordered]
    by_size = sorted(ordered, key=lambda d: (-sizes.get(d.dist_info, 0), d.dist_info))
    own = by_size[: max_layers - buckets]
    shared: dict[int, list[Distribution]] = {}
    for dist in by_size[max_layers - buckets :]:
        bucket = int(hashlib.sha256(dist.name.encode()).hexdigest(), 16) % buckets
        shared.setdefault(bucket, []).append(dist)
    groups = [PackageGroup((d,)) for d in own]
    for bucket in sorted(shared):
        groups.append(PackageGroup(tuple(sorted(shared[bucket], key=lambda d: d.dist_info))))
    return sorted(groups, key=lambda g: g.distributions[0].dist_info)


def package_layer_budget(base_layers: int) -> int:
    """How many package layers an image on a base with ``base_layers`` layers may have."""
    # Three more layers: the virtualenv, the model server and the model.
    return max(
        SMALL_PACKAGE_BUCKETS + 1, min(MAX_PACKAGE_LAYERS, IMAGE_LAYER_BUDGET - base_layers - 3)
    )


def installed_size(dist: Distribution, target_dir: Path) -> int:
    total = 0
    for relative in dist.files:
        try:
            total += (target_dir / relative).lstat().st_size
        except OSError:
            continue
    return total
