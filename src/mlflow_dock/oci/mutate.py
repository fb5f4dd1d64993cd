"""Image mutation (pure: never imports registry I/O): a model layer, and a manifest + config
rewritten to replace an image's last layer with it.

Every version of a model with the same runtime (requirements, base image, Dockerfile) shares all
layers but the last, ``COPY model/ /opt/ml/model/`` (see :mod:`mlflow_dock.build.dockerfile`). Even
with every other layer cached, building that with the Docker Engine and pushing it costs seconds:
the context upload, committing a container layer, a push that asks the registry about each layer
before it uploads the one new blob. So, as Jib and crane (``crane mutate``/``crane append``) do,
the new image is written straight into the registry instead:

* one new layer blob: the model directory as a reproducible gzip tar placed at /opt/ml/model/;
* one new config blob: the previous config with that layer's diff_id, its history entry, the
  labels and the creation time replaced;
* one new manifest: the previous manifest with the last layer and the config descriptors
  replaced. No layer of the previous image is downloaded, and no Docker Engine is involved.

The previous image is only trusted as far as it is checked: a single-image manifest (never an
index), its last layer written by the model ``COPY``, nothing but metadata after it, and
optionally given labels (the runtime key). That the runtime really is the same is the caller's
precondition; :class:`NotAssemblable` means "build with the engine instead".

Replacing the last layer rather than appending one means no whiteouts are needed: no layer below
it has anything under /opt/ml/model.
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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, NamedTuple, cast

from mlflow_dock.errors import PermanentError
from mlflow_dock.oci.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Manifest,
)

__all__ = [
    "CREATED_BY_SUFFIX",
    "HashingWriter",
    "Layer",
    "LayerDigests",
    "NotAssemblable",
    "Rewritten",
    "manifest_document",
    "model_layer",
    "refuse",
    "replace_last_layer",
    "write_model_layer",
]

_LAYER_TYPE: Final = {DOCKER_MANIFEST: DOCKER_LAYER, OCI_MANIFEST: OCI_LAYER}
_CONFIG_TYPES: Final = frozenset({DOCKER_CONFIG, OCI_CONFIG})
_INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

CREATED_BY_SUFFIX: Final = "# mlflow-dock registry assembly"
# Go's default gzip level, as the engine uses: level 9 costs ~3x the time for ~1% on models.
_GZIP_LEVEL: Final = 6
_CHUNK: Final = 1 << 20
_CREATED_ANNOTATION: Final = "org.opencontainers.image.created"


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
        arcname = f"{prefix}/{name}"
        yield arcname, info, path
        if stat.S_ISDIR(info.st_mode):
            yield from _entries(path, arcname)


def write_model_layer(
    model_dir: Path,
    out: IO[bytes],
    *,
    target: str,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
) -> LayerDigests:
    """Write ``model_dir`` as a gzip layer tar placing its contents at ``target`` into ``out``.

    Reproducible: entries sorted, times fixed to ``mtime``, owners ``uid``/``gid`` without names,
    gzip header without time or file name, so the same tree gives byte-identical blobs (with the
    same zlib; the diff_id does not depend on it). Modes are normalised to 0755 for directories
    and executables and 0644 for other files: owner-only modes from a download would make the
    model unreadable to the image's non-root user. Symlinks are kept as symlinks, as ``COPY``
    keeps them; hard links become copies.
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
                info = tarfile.TarInfo(name)
                info.type = kind
                info.mode = mode
                info.uid, info.gid = uid, gid
                info.uname = info.gname = ""
                info.mtime = mtime
                return info

            # Parents too, as the engine writes them: a layer is applied entry by entry.
            for depth in range(1, len(parts) + 1):
                tar.addfile(header("/".join(parts[:depth]), tarfile.DIRTYPE, 0o755))
            for arcname, info, path in _entries(model_dir, "/".join(parts)):
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


def _model_entry(history: list[Any], n_layers: int, target: str) -> int:
    """Index of the history entry that wrote the last layer; refuses anything else."""
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
        # The classic builder records build-time labels as a trailing LABEL; anything else
        # there means a different Dockerfile.
        if not _LABEL_RE.search(str(entry.get("created_by", ""))):
            raise refuse(
                "it has instructions after its model layer: "
                f"{str(entry.get('created_by', ''))[:120]!r}"
            )
    return index


def replace_last_layer(
    manifest: Manifest | bytes | Mapping[str, Any],
    config: bytes,
    layer: Layer | LayerDigests,
    *,
    labels: Mapping[str, str],
    created: str,
    remove_labels: Iterable[str] = (),
    require_labels: Mapping[str, str] | None = None,
    target: str,
    media_type: str | None = None,
) -> Rewritten:
    """The new image's config and manifest: the previous ones with the model layer replaced.

    Labels are set the way the engine sets build labels: over the labels the image inherits
    (base image, runtime key). Every label a version build sets is therefore overwritten; a
    label the previous version had but this one must not is listed in ``remove_labels``.
    ``require_labels`` must all be on the previous image (e.g. the runtime key), else
    :class:`NotAssemblable`. ``media_type`` is needed only for OCI manifests without their own
    ``mediaType`` passed as bytes or dict.
    """
    document, kind = manifest_document(manifest, media_type)
    layers = document["layers"]
    config_descriptor = document["config"]
    if config_descriptor.get("digest") != "sha256:" + hashlib.sha256(config).hexdigest():
        raise refuse("the config given is not the one its manifest names")
    try:
        image = json.loads(config)
    except ValueError as exc:
        raise refuse("its config is not JSON") from exc
    rootfs = image.get("rootfs") if isinstance(image, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise refuse("its config's rootfs.diff_ids do not match its manifest's layers")
    history = image.get("history")
    index = _model_entry(history if isinstance(history, list) else [], len(layers), target)

    container_config = image.get("config")
    if not isinstance(container_config, dict):
        container_config = {}
    previous_labels = container_config.get("Labels") or {}
    for key, value in (require_labels or {}).items():
        if previous_labels.get(key) != value:
            raise refuse(
                f"it has label {key}={previous_labels.get(key)!r}, this version needs {value!r}"
            )
    removed = set(remove_labels)
    new_labels = {k: v for k, v in previous_labels.items() if k not in removed}
    new_labels.update(labels)

    diff_ids[-1] = layer.diff_id
    image["history"] = [
        *history[:index],
        {
            "created": created,
            "created_by": f"COPY model/ {target.rstrip('/')}/ {CREATED_BY_SUFFIX}",
            "comment": "assembled in the registry from the previous version's image",
        },
    ]
    image["created"] = created
    container_config["Labels"] = new_labels
    image["config"] = container_config
    # The classic builder's record of its build container: another container, old labels.
    image.pop("container", None)
    image.pop("container_config", None)
    config_bytes = json.dumps(image, separators=(",", ":")).encode()

    # Fresh descriptors: annotations or urls of the old blobs would describe other content.
    document["config"] = {
        "mediaType": config_descriptor["mediaType"],
        "size": len(config_bytes),
        "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
    }
    layers[-1] = {"mediaType": _LAYER_TYPE[kind], "size": layer.size, "digest": layer.digest}
    annotations = document.get("annotations")
    if isinstance(annotations, dict) and _CREATED_ANNOTATION in annotations:
        annotations[_CREATED_ANNOTATION] = created
    manifest_bytes = json.dumps(document, separators=(",", ":")).encode()
    return Rewritten(config=config_bytes, manifest=manifest_bytes, media_type=kind)
