"""Image mutation (pure: never imports registry I/O): a model's layers, and a manifest + config
rewritten to replace an image's model layers with them.

Every version of a model with the same runtime (requirements, base image, Dockerfile) shares all
layers but its model layers (see :mod:`mlflow_dock.imaging.dockerfile`): the engine writes one,
``COPY model/ /opt/ml/model/``; mlflow-dock writes each model file of at least a threshold (the
weights) as a layer of its own, then the rest of the model directory as the last layer.
Even with every other layer cached, building that with the Docker Engine and pushing it costs
seconds: the context upload, committing a container layer, a push that asks the registry about each
layer before it uploads the one new blob. So, as Jib and crane (``crane mutate``/``crane append``)
do, the new image is written straight into the registry instead:

* the new model layers: each big file as a plain tar (:class:`FileLayer`: weights do not
  compress, and a plain layer costs one hash pass; its bytes depend only on the file's content,
  path and mode, so a version that keeps its weights has the very same layer), the rest as a
  reproducible gzip tar (:func:`write_model_layer`), all placed under /opt/ml/model/;
* one new config blob: the previous config with the model layers' diff_ids and history entries,
  the labels, the version's environment (its V2 name and version) and the creation time
  replaced;
* one new manifest: the previous manifest with the model layers and the config descriptors
  replaced. No layer of the previous image is downloaded, and no Docker Engine is involved.

The previous image is only trusted as far as it is checked: a single-image manifest (never an
index), its last layer written by the model ``COPY``, directly below it only other copies into
the model directory such as model file layers (recognised by their history entries, not their
position: :func:`model_layers`, the rule Modelcars use too), nothing after them but labels and
the environment being replaced, and optionally given labels (the runtime key). That the
runtime really is the same is the caller's precondition; :class:`NotAssemblable` means "build
with the engine instead".

Replacing the model layers rather than appending means no whiteouts are needed: no layer below
them has anything under /opt/ml/model.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, NamedTuple, cast

from mlflow_dock.errors import PermanentError
from mlflow_dock.oci.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_TAR,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Manifest,
)
from mlflow_dock.oci.streams import SizedReader

__all__ = [
    "CREATED_BY_SUFFIX",
    "MODEL_FILE_MARK",
    "EarlierImage",
    "FileLayer",
    "HashingWriter",
    "Layer",
    "LayerDigests",
    "ModelLayer",
    "NotAssemblable",
    "Rewritten",
    "compressible",
    "earlier_image",
    "layered_files",
    "manifest_document",
    "model_layer",
    "model_layers",
    "refuse",
    "replace_model_layers",
    "write_model_layer",
]

_LAYER_TYPE: Final = {DOCKER_MANIFEST: DOCKER_LAYER, OCI_MANIFEST: OCI_LAYER}
_PLAIN_LAYER_TYPE: Final = {DOCKER_MANIFEST: DOCKER_LAYER_TAR, OCI_MANIFEST: OCI_LAYER_TAR}
_CONFIG_TYPES: Final = frozenset({DOCKER_CONFIG, OCI_CONFIG})
_INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# A Docker manifest that gets a plain layer becomes an OCI manifest (Docker's schema 2 names no
# uncompressed layer type); its blobs stay what they are, only the descriptors' types change.
_TO_OCI: Final = {
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_LAYER: OCI_LAYER,
    DOCKER_LAYER_TAR: OCI_LAYER_TAR,
    OCI_CONFIG: OCI_CONFIG,
    OCI_LAYER: OCI_LAYER,
    OCI_LAYER_TAR: OCI_LAYER_TAR,
}

CREATED_BY_SUFFIX: Final = "# mlflow-dock registry assembly"
# Ends the history entry of a model file's own layer: how the next version finds every model
# layer of an image (by what wrote them, not by their position).
MODEL_FILE_MARK: Final = "# mlflow-dock model file"
# Go's default gzip level, as the engine uses: level 9 costs ~3x the time for ~1% on models.
_GZIP_LEVEL: Final = 6
_CHUNK: Final = 1 << 20
_CREATED_ANNOTATION: Final = "org.opencontainers.image.created"
# Compressibility is judged on a few windows of a file: gzip (level 1) must bring them under
# this share of their size for the file's layer to be compressed. Measured on float32/float16
# weights: 0.93; on int8 and random bytes: 1.0 (and gzip costs 15-30 MB/s per core).
_SAMPLE: Final = 256 << 10
_WORTH_COMPRESSING: Final = 0.8


class NotAssemblable(PermanentError):
    """The previous image cannot be the base of a registry assembly: build with the engine."""


# --------------------------------------------------------------------------- the model layer


@dataclass(frozen=True)
class LayerDigests:
    digest: str  # sha256 of the gzip blob: the manifest's layer descriptor
    diff_id: str  # sha256 of the uncompressed tar: the config's rootfs.diff_ids
    size: int  # bytes of the gzip blob


@dataclass(frozen=True)
class Layer:
    data: bytes = field(repr=False)
    digest: str
    diff_id: str
    size: int


@dataclass(frozen=True)
class ModelLayer:
    """One of a model's layers, as a manifest and a config describe it."""

    digest: str
    diff_id: str
    size: int
    compressed: bool = True  # gzip; False: a plain tar (digest == diff_id)
    file: str | None = None  # the one model file it holds; None: the rest of the model

    def media_type(self, manifest_type: str = OCI_MANIFEST) -> str:
        return (_LAYER_TYPE if self.compressed else _PLAIN_LAYER_TYPE)[manifest_type]

    def descriptor(self, manifest_type: str = OCI_MANIFEST) -> dict[str, Any]:
        return {
            "mediaType": self.media_type(manifest_type),
            "digest": self.digest,
            "size": self.size,
        }

    def created_by(self, target: str, suffix: str) -> str:
        """Its history entry; ``suffix`` ends the entry of the rest of the model."""
        root = target.rstrip("/")
        if self.file is None:
            return f"COPY model/ {root}/ {suffix}"
        return f"COPY model/{self.file} {root}/{self.file} {MODEL_FILE_MARK}"


class HashingWriter:
    """Write-through that hashes and counts what passes; tarfile and gzip need only write()."""

    def __init__(self, sink: IO[bytes] | gzip.GzipFile) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._sink.write(data)

    def flush(self) -> None:
        self._sink.flush()

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


def _target_parts(target: str) -> tuple[str, ...]:
    path = PurePosixPath(target)
    if not path.is_absolute() or ".." in path.parts or len(path.parts) < 2:
        raise ValueError(f"layer target must be an absolute directory path, not {target!r}")
    return path.parts[1:]


def _entries(model_dir: Path, prefix: str) -> Iterator[tuple[str, os.stat_result, Path]]:
    """(name in the tar, lstat, path) depth first, names sorted: the same tree, the same order."""
    for name in sorted(os.listdir(model_dir)):
        path = model_dir / name
        info = path.lstat()
        arcname = f"{prefix}/{name}" if prefix else name
        yield arcname, info, path
        if stat.S_ISDIR(info.st_mode):
            yield from _entries(path, arcname)


def layered_files(model_dir: Path, *, min_bytes: int, limit: int) -> tuple[str, ...]:
    """The model's files (paths relative to ``model_dir``) that get a layer of their own.

    Regular files of at least ``min_bytes``; beyond ``limit`` of them, the largest (ties by
    path): the image must stay within the runtimes' layer limit. Sorted by path.
    """
    if limit <= 0:
        return ()
    big = [
        (info.st_size, relative)
        for relative, info, _ in _entries(model_dir, "")
        if stat.S_ISREG(info.st_mode) and info.st_size >= min_bytes
    ]
    big.sort(key=lambda item: (-item[0], item[1]))
    return tuple(sorted(relative for _, relative in big[:limit]))


def compressible(path: Path) -> bool:
    """Whether gzip would shrink the file enough to be worth its time (a few windows tried)."""
    size = path.stat().st_size
    sampled = compressed = 0
    with path.open("rb") as file:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            file.seek(offset)
            window = file.read(_SAMPLE)
            sampled += len(window)
            compressed += len(zlib.compress(window, 1))
    return sampled > 0 and compressed < _WORTH_COMPRESSING * sampled


def _header(name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = mtime
    return info


def write_model_layer(
    model_dir: Path,
    out: IO[bytes],
    *,
    target: str,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
    exclude: Collection[str] = (),
) -> LayerDigests:
    """Write ``model_dir`` as a gzip layer tar placing its contents at ``target`` into ``out``.

    Reproducible: entries sorted, times fixed to ``mtime``, owners ``uid``/``gid`` without names,
    gzip header without time or file name, so the same tree gives byte-identical blobs (with the
    same zlib; the diff_id does not depend on it). Modes are normalised to 0755 for directories
    and executables and 0644 for other files: owner-only modes from a download would make the
    model unreadable to the image's non-root user. Symlinks are kept as symlinks, as ``COPY``
    keeps them; hard links become copies. ``exclude``: files (relative to ``model_dir``) left
    out, because they have layers of their own (:class:`FileLayer`).
    """
    if not model_dir.is_dir():
        raise PermanentError(f"model directory {model_dir} does not exist")
    parts = _target_parts(target)
    compressed = HashingWriter(out)
    # filename="" keeps the name out of the header; mtime=0 keeps the time out.
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=compressed, compresslevel=_GZIP_LEVEL, mtime=0
    ) as gz:
        uncompressed = HashingWriter(gz)
        # Stream mode ("w|") only ever calls write(), which is all the hashing writer has.
        stream = cast(IO[bytes], uncompressed)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:

            def header(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
                return _header(name, kind, mode, uid, gid, mtime)

            # Parents too, as the engine writes them: a layer is applied entry by entry.
            for depth in range(1, len(parts) + 1):
                tar.addfile(header("/".join(parts[:depth]), tarfile.DIRTYPE, 0o755))
            root = "/".join(parts)
            excluded = {f"{root}/{relative}" for relative in exclude}
            for arcname, info, path in _entries(model_dir, root):
                if arcname in excluded:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    tar.addfile(header(arcname, tarfile.DIRTYPE, 0o755))
                elif stat.S_ISREG(info.st_mode):
                    mode = 0o755 if info.st_mode & 0o111 else 0o644
                    entry = header(arcname, tarfile.REGTYPE, mode)
                    entry.size = info.st_size
                    with path.open("rb") as file:
                        tar.addfile(entry, file)
                elif stat.S_ISLNK(info.st_mode):
                    entry = header(arcname, tarfile.SYMTYPE, 0o777)
                    entry.linkname = os.readlink(path)
                    tar.addfile(entry)
                else:
                    raise PermanentError(
                        f"model directory holds {path}, which is neither a file, a directory "
                        "nor a symlink"
                    )
    return LayerDigests(
        digest=compressed.digest(), diff_id=uncompressed.digest(), size=compressed.size
    )


def model_layer(
    model_dir: Path,
    *,
    target: str,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
) -> Layer:
    """:func:`write_model_layer` into memory; for small models and tests."""
    buffer = io.BytesIO()
    digests = write_model_layer(model_dir, buffer, target=target, uid=uid, gid=gid, mtime=mtime)
    return Layer(
        data=buffer.getvalue(), digest=digests.digest, diff_id=digests.diff_id, size=digests.size
    )


class FileLayer(SizedReader):
    """The plain layer tar of one model file, as a seekable stream that is never in memory.

    The tar is its parent directories' headers, the file's header, the file's bytes and the
    end-of-archive padding, as :mod:`tarfile` writes them; only the headers are kept here, the
    file is read from disk as the stream is read. Hand-written around :mod:`tarfile`'s own
    header encoding because its stream mode copies a file in 16 KiB pieces through a small
    buffer and cannot seek: a multi-GB weights file is read here in large pieces, twice at
    most (hashed, then uploaded), and an interrupted upload resumes at any offset.

    Its bytes depend only on the file's content, its path in the model and its mode (owners,
    times and the parents' modes are fixed), so the same weights give the same layer in every
    version.
    """

    def __init__(
        self,
        model_dir: Path,
        relative: str,
        *,
        target: str,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
    ) -> None:
        parts = _target_parts(target)
        self.path = model_dir / relative
        self.relative = relative
        info = self.path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise PermanentError(f"model file {relative} is not a regular file")
        self.file_size = info.st_size
        names = [*parts, *PurePosixPath(relative).parts]
        head = b"".join(
            _header("/".join(names[:depth]), tarfile.DIRTYPE, 0o755, uid, gid, mtime).tobuf(
                tarfile.PAX_FORMAT, "utf-8", "surrogateescape"
            )
            for depth in range(1, len(names))
        )
        entry = _header(
            "/".join(names),
            tarfile.REGTYPE,
            0o755 if info.st_mode & 0o111 else 0o644,
            uid,
            gid,
            mtime,
        )
        entry.size = self.file_size
        self._head = head + entry.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        written = len(self._head) + self.file_size
        padding = -self.file_size % tarfile.BLOCKSIZE
        end = padding + 2 * tarfile.BLOCKSIZE
        end += -(written + end) % tarfile.RECORDSIZE
        self._tail = b"\0" * end
        super().__init__(written + end)
        self._file: IO[bytes] | None = None

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer)
        head, size = len(self._head), self.file_size
        position, filled = self._position, 0
        while filled < len(view) and position < self.size:
            if position < head:
                part = self._head[position : position + len(view) - filled]
            elif position < head + size:
                part = self._file_bytes(
                    position - head, min(len(view) - filled, head + size - position)
                )
            else:
                start = position - head - size
                part = self._tail[start : start + len(view) - filled]
            view[filled : filled + len(part)] = part
            filled += len(part)
            position += len(part)
        self._position = position
        return filled

    def _file_bytes(self, offset: int, count: int) -> bytes:
        if self._file is None:
            self._file = self.path.open("rb")
        self._file.seek(offset)
        data = self._file.read(count)
        if len(data) != count:
            raise self._changed()
        return data

    def _changed(self) -> PermanentError:
        return PermanentError(f"model file {self.relative} changed while it was packed")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()

    def digests(self) -> LayerDigests:
        """One pass over the layer: its digest, which is its diff_id (plain tar).

        The file is hashed straight from one reused buffer rather than through ``read``'s
        copies: for a version that keeps its weights, this pass is most of the build (about
        0.1 s less per GiB).
        """
        digest = hashlib.sha256(self._head)
        buffer = memoryview(bytearray(_CHUNK))
        left = self.file_size
        with self.path.open("rb", buffering=0) as file:
            while left:
                count = file.readinto(buffer[: min(_CHUNK, left)])
                if not count:
                    raise self._changed()
                digest.update(buffer[:count])
                left -= count
        digest.update(self._tail)
        value = "sha256:" + digest.hexdigest()
        return LayerDigests(digest=value, diff_id=value, size=self.size)

    def write_gzip(self, out: IO[bytes]) -> LayerDigests:
        """The layer gzip-compressed into ``out`` (for a model file that compresses well)."""
        compressed = HashingWriter(out)
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=compressed, compresslevel=_GZIP_LEVEL, mtime=0
        ) as gz:
            uncompressed = HashingWriter(gz)
            self.seek(0)
            for chunk in iter(lambda: self.read(_CHUNK), b""):
                uncompressed.write(chunk)
        return LayerDigests(compressed.digest(), uncompressed.digest(), compressed.size)


# --------------------------------------------------------------------------- config + manifest


class Rewritten(NamedTuple):
    config: bytes
    manifest: bytes
    media_type: str


def refuse(message: str) -> NotAssemblable:
    return NotAssemblable(f"cannot assemble from the previous image: {message}")


def _model_copy_re(target: str) -> re.Pattern[str]:
    # BuildKit/kaniko: "COPY model/ /opt/ml/model/ # buildkit"; the classic builder (and this
    # module's own history entry): "/bin/sh -c #(nop) COPY dir:<sha256> in /opt/ml/model/ ".
    return re.compile(
        r"(?:^|\s)COPY\s+(?:--\S+\s+)*(?:\./)?(?:model/?|dir:[0-9a-f]+\s+in)\s+"
        + re.escape(target.rstrip("/"))
        + r"/?(?:\s|$)"
    )


_LABEL_RE: Final = re.compile(r"(?:^|\s)LABEL\s")
# "ENV KEY=value ..." as BuildKit records it, "/bin/sh -c #(nop)  ENV KEY=value" (classic).
_ENV_RE: Final = re.compile(r"(?:^|\s)ENV\s+([A-Za-z_][A-Za-z0-9_]*)=")


def manifest_document(
    manifest: Manifest | bytes | Mapping[str, Any], media_type: str | None
) -> tuple[dict[str, Any], str]:
    if isinstance(manifest, Manifest):
        media_type = media_type or manifest.media_type
        manifest = manifest.body
    if isinstance(manifest, bytes):
        try:
            document = json.loads(manifest)
        except ValueError as exc:
            raise refuse("its manifest is not JSON") from exc
    else:
        document = copy.deepcopy(dict(manifest))
    if not isinstance(document, dict):
        raise refuse("its manifest is not a JSON object")
    declared = document.get("mediaType")
    kind = declared if isinstance(declared, str) and declared else media_type
    if kind is None and isinstance(document.get("config"), dict):
        # OCI makes mediaType optional; the config descriptor still says what this is.
        config_type = document["config"].get("mediaType")
        kind = OCI_MANIFEST if config_type == OCI_CONFIG else DOCKER_MANIFEST
    if kind in _INDEX_TYPES or "manifests" in document:
        raise refuse(
            "it is an image index (manifest list), not a single image; registry assembly "
            "needs the single-platform image the engine pushes"
        )
    if kind not in _LAYER_TYPE or document.get("schemaVersion") != 2:
        raise refuse(f"unsupported manifest type {kind!r}")
    config = document.get("config")
    layers = document.get("layers")
    if not isinstance(config, dict) or config.get("mediaType") not in _CONFIG_TYPES:
        raise refuse("its config is not a container image config")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) for x in layers):
        raise refuse("its manifest lists no layers")
    return document, str(kind)


def _model_file_path(created_by: str, target: str) -> str | None:
    """The path a model file layer's history entry (:meth:`ModelLayer.created_by`) names."""
    prefix, suffix, root = "COPY model/", f" {MODEL_FILE_MARK}", target.rstrip("/")
    if not (created_by.startswith(prefix) and created_by.endswith(suffix)):
        return None
    rest = created_by[len(prefix) : -len(suffix)]
    path = rest[: (len(rest) - len(root) - 2) // 2]
    return path if path and rest == f"{path} {root}/{path}" else None


def _is_model_copy(created_by: str, target: str) -> bool:
    """Whether a history entry copies something into ``target`` (the model directory): the
    engine's or this project's ``COPY model/``, and a model file's own layer alike."""
    return (
        re.search(
            r"(?:^|\s)COPY\s.*\s" + re.escape(target.rstrip("/")) + r"(?:/\S*)?(?:\s|$)", created_by
        )
        is not None
    )


def _trailing_model_layers(layered: Sequence[Mapping[str, Any]], target: str) -> list[int]:
    """Positions in ``layered`` (the history entries that wrote a layer) of the model's layers.

    The one rule for every reader of an image (registry assembly, Modelcars): the image's last
    layers whose entries copy into ``target``. Entries without a layer (labels, the version's
    environment) are not in ``layered``, so they never separate model layers; any other layer
    ends the run.
    """
    found: list[int] = []
    for position in range(len(layered) - 1, -1, -1):
        if not _is_model_copy(str(layered[position].get("created_by", "")), target):
            break
        found.insert(0, position)
    return found


def model_layers(config: bytes | Mapping[str, Any], layers: list[Any], target: str) -> list[int]:
    """Indexes (into ``layers``) of the model's layers: the image's last layers, copied to
    ``target``, with nothing but metadata (labels, environment) after them.

    One for an image the engine builds; more where big model files get layers of their own
    (:class:`FileLayer`). Empty when the image's last layer is not the model's (MLflow's stock
    image installs the model's requirements after copying it): nothing then holds the model
    alone.
    """
    image = json.loads(config) if isinstance(config, bytes) else config
    history = image.get("history") if isinstance(image, Mapping) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        return []
    layered = [entry for entry in history if not entry.get("empty_layer")]
    if len(layered) != len(layers):
        return []
    return _trailing_model_layers(layered, target)


def _model_entries(
    history: list[Any], n_layers: int, target: str, env_keys: Collection[str] = ()
) -> tuple[int, int]:
    """(history index of the first model layer's entry, how many model layers) of an image.

    The model layers are :func:`model_layers`' (however many); to be assembled on, the last of
    them must be the model ``COPY`` (the rest of the model, its MLmodel), and after it only
    labels and the environment in ``env_keys`` (replaced by the new version); anything else
    is refused.
    """
    if not history or not all(isinstance(entry, dict) for entry in history):
        raise refuse("its config has no history, so its last layer cannot be identified")
    layered = [i for i, entry in enumerate(history) if not entry.get("empty_layer")]
    if len(layered) != n_layers:
        raise refuse(f"its history describes {len(layered)} layers, its rootfs {n_layers}")
    index = layered[-1]
    if not _model_copy_re(target).search(str(history[index].get("created_by", ""))):
        raise refuse(
            f"previous image's last layer is not a model layer (COPY model/ {target}/); "
            f"it was made by {str(history[index].get('created_by', ''))[:120]!r}"
        )
    for entry in history[index + 1 :]:
        created_by = str(entry.get("created_by", ""))
        # The classic builder records build-time labels as a trailing LABEL, and the version's
        # own environment (replaced here) comes after its model; anything else there means a
        # different Dockerfile.
        env = _ENV_RE.search(created_by)
        if not _LABEL_RE.search(created_by) and not (env and env.group(1) in env_keys):
            raise refuse(f"it has instructions after its model layer: {created_by[:120]!r}")
    count = len(_trailing_model_layers([history[i] for i in layered], target))
    return layered[-count], count


def _set_env(current: Any, updates: Mapping[str, str]) -> list[str]:
    """``KEY=value`` entries with ``updates`` replacing (or added after) their keys."""
    entries = [str(item) for item in current] if isinstance(current, list) else []
    kept = [item for item in entries if item.partition("=")[0] not in updates]
    return kept + [f"{key}={value}" for key, value in updates.items()]


def _as_oci(document: dict[str, Any]) -> None:
    """Turn a Docker schema 2 manifest into the OCI manifest of the same blobs, in place."""
    for descriptor in [document["config"], *document["layers"]]:
        converted = _TO_OCI.get(str(descriptor.get("mediaType")))
        if converted is None:
            raise refuse(
                f"it has a {descriptor.get('mediaType')!r} layer, which OCI has no type for"
            )
        descriptor["mediaType"] = converted
    document["mediaType"] = OCI_MANIFEST


@dataclass(frozen=True)
class EarlierImage:
    """A previous image, checked to be one a version can be assembled on (:func:`earlier_image`)."""

    document: Mapping[str, Any]  # its manifest
    kind: str  # its manifest's media type
    image: Mapping[str, Any]  # its config
    target: str  # where its model is
    first_model_entry: int  # history index of its first model layer's entry
    model_layers: int  # how many of its last layers hold the model
    # The environment variables that may follow its model (the version's own, replaced).
    env_keys: frozenset[str] = frozenset()

    @property
    def layers_below(self) -> int:
        """Its layers that are not the model's: what the new version keeps."""
        return len(self.document["layers"]) - self.model_layers

    @property
    def model_files(self) -> dict[str, str]:
        """Its model files with a layer of their own: path in the model -> layer digest."""
        layered = [
            entry
            for entry in self.image["history"][self.first_model_entry :]
            if not entry.get("empty_layer")
        ]
        descriptors = self.document["layers"][-self.model_layers :]
        found = {}
        for entry, descriptor in zip(layered, descriptors, strict=True):
            path = _model_file_path(str(entry.get("created_by", "")), self.target)
            if path is not None:
                found[path] = str(descriptor["digest"])
        return found


def earlier_image(
    manifest: Manifest | bytes | Mapping[str, Any],
    config: bytes,
    *,
    target: str,
    require_labels: Mapping[str, str] | None = None,
    media_type: str | None = None,
    env_keys: Iterable[str] = (),
) -> EarlierImage:
    """``manifest`` and ``config`` checked to be an image a version can be assembled on.

    However many model layers it has (one from the engine's ``COPY``, several from
    mlflow-dock), they are found by their history entries (:func:`model_layers`).
    ``env_keys``: the version's own environment variables (its V2 name and version), which
    may be recorded after the model and are replaced (:func:`replace_model_layers`'s ``env``).
    ``require_labels`` must all be on it (e.g. the runtime key), else :class:`NotAssemblable`.
    ``media_type`` is needed only for OCI manifests without their own ``mediaType`` passed as
    bytes or dict.
    """
    document, kind = manifest_document(manifest, media_type)
    descriptors = document["layers"]
    if document["config"].get("digest") != "sha256:" + hashlib.sha256(config).hexdigest():
        raise refuse("the config given is not the one its manifest names")
    try:
        image = json.loads(config)
    except ValueError as exc:
        raise refuse("its config is not JSON") from exc
    rootfs = image.get("rootfs") if isinstance(image, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(descriptors):
        raise refuse("its config's rootfs.diff_ids do not match its manifest's layers")
    history = image.get("history")
    keys = frozenset(env_keys)
    index, count = _model_entries(
        history if isinstance(history, list) else [], len(descriptors), target, keys
    )
    container_config = image.get("config")
    labels = (container_config.get("Labels") if isinstance(container_config, dict) else None) or {}
    for key, value in (require_labels or {}).items():
        if labels.get(key) != value:
            raise refuse(f"it has label {key}={labels.get(key)!r}, this version needs {value!r}")
    return EarlierImage(document, kind, image, target, index, count, keys)


def replace_model_layers(
    earlier: EarlierImage,
    layers: Sequence[ModelLayer],
    *,
    labels: Mapping[str, str],
    created: str,
    remove_labels: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> Rewritten:
    """The new image's config and manifest: ``earlier``'s with every model layer replaced by
    ``layers`` (the model's file layers, then the rest of it last).

    Labels are set the way the engine sets build labels: over the labels the image inherits
    (base image, runtime key). Every label a version build sets is therefore overwritten; a
    label the previous version had but this one must not is listed in ``remove_labels``.
    ``env``: the version's own environment variables (its V2 name and version), set over the
    previous version's values and recorded after the model layers as the engine would; it
    must set every key ``earlier`` was checked for (``env_keys``).
    """
    if not layers or layers[-1].file is not None:
        raise ValueError("the rest of the model must be the last of the model layers")
    env = dict(env or {})
    if not earlier.env_keys <= env.keys():
        # Its ENV entries go with its model's history; their values must be replaced too.
        raise ValueError(f"env must set {sorted(earlier.env_keys - env.keys())}")
    document = copy.deepcopy(dict(earlier.document))
    image = copy.deepcopy(dict(earlier.image))
    kind, replaced, target = earlier.kind, earlier.model_layers, earlier.target
    if kind == DOCKER_MANIFEST and not all(layer.compressed for layer in layers):
        _as_oci(document)
        kind = OCI_MANIFEST

    container_config = image.get("config")
    if not isinstance(container_config, dict):
        container_config = {}
    removed = set(remove_labels)
    new_labels = {
        k: v for k, v in (container_config.get("Labels") or {}).items() if k not in removed
    }
    new_labels.update(labels)

    image["rootfs"]["diff_ids"][-replaced:] = [layer.diff_id for layer in layers]
    image["history"] = [
        *image["history"][: earlier.first_model_entry],
        *(
            {
                "created": created,
                "created_by": layer.created_by(target, CREATED_BY_SUFFIX),
                "comment": "assembled in the registry from the previous version's image",
            }
            for layer in layers
        ),
    ]
    if env:
        container_config["Env"] = _set_env(container_config.get("Env"), env)
        image["history"].append(
            {
                "created": created,
                "created_by": "ENV "
                + " ".join(f"{key}={json.dumps(value)}" for key, value in env.items())
                + f" {CREATED_BY_SUFFIX}",
                "empty_layer": True,
            }
        )
    image["created"] = created
    container_config["Labels"] = new_labels
    image["config"] = container_config
    # The classic builder's record of its build container: another container, old labels.
    image.pop("container", None)
    image.pop("container_config", None)
    config_bytes = json.dumps(image, separators=(",", ":")).encode()

    # Fresh descriptors: annotations or urls of the old blobs would describe other content.
    document["config"] = {
        "mediaType": document["config"]["mediaType"],
        "size": len(config_bytes),
        "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
    }
    document["layers"][-replaced:] = [layer.descriptor(kind) for layer in layers]
    annotations = document.get("annotations")
    if isinstance(annotations, dict) and _CREATED_ANNOTATION in annotations:
        annotations[_CREATED_ANNOTATION] = created
    manifest_bytes = json.dumps(document, separators=(",", ":")).encode()
    return Rewritten(config=config_bytes, manifest=manifest_bytes, media_type=kind)
