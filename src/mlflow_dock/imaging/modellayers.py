"""A model's layers, written to the registry: each big file a layer of its own, the rest one.

Weights are most of a model's bytes and often outlive a version: a version that changes its
code or a small file keeps them. So every regular file of at least
:attr:`ModelLayerPolicy.file_layer_bytes` becomes a layer of its own whose bytes depend only on
the file's content, path and mode (:class:`~mlflow_dock.oci.mutate.FileLayer`); a later version
with the same weights has the very same layer, which the registry already holds: it is hashed
once and not uploaded again. The rest of the model directory stays one gzip layer, the last.

Codec per file, by measurement: weights barely compress (float32/float16: gzip saves ~7 % at
15-30 MB/s per core; int8 and random bytes: nothing), so a file layer is a plain tar (digest =
diff_id, one hash pass, streamed from disk; Docker 20.10, containerd 1.6 and Podman pull them)
unless a few windows of the file compress well (text, zero-padded tensors), then gzip.

Everything streams: no layer, file or blob is held in memory (:class:`FileLayer` reads the file
as it is hashed and uploaded; uploads are chunked and resume, see ``oci/remote.py``).

:func:`push_model_layers` is the one place a model's layers are made, for every strategy that
writes an image of a model: the native builder, registry assembly on an earlier image, and a
Modelcar image, which shares these very blobs.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, cast

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.dockerfile import MODEL_DIR
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.oci.mutate import (
    FileLayer,
    ModelLayer,
    compressible,
    layered_files,
    write_model_layer,
)
from mlflow_dock.oci.remote import RegistryClient

__all__ = [
    "DEFAULT_FILE_LAYER_BYTES",
    "MAX_FILE_LAYERS",
    "MAX_IMAGE_LAYERS",
    "ModelLayerPolicy",
    "push_model_layers",
]

# Files at least this big get a layer of their own. Below it, re-uploading a changed file with
# the rest of the model costs less than a layer more for every version (a HEAD per version, a
# layer per pull, the runtimes' layer limit).
DEFAULT_FILE_LAYER_BYTES: Final = 32 << 20
# Runtimes refuse images beyond ~127 layers (overlayfs' stacking limit; Docker and containerd
# check it); model file layers never take an image past this many layers in all.
MAX_IMAGE_LAYERS: Final = 120
# And never more than this many of them: beyond, the largest files keep a layer of their own.
MAX_FILE_LAYERS: Final = 32
# The rest of the model is packed in memory up to this size, else in a temporary file.
_SPOOL_IN_MEMORY: Final = 8 << 20

# Told "uploaded" / "present" / "tarred" per layer, for the builder's counts.
OnLayer = Callable[[str], None]


@dataclass(frozen=True)
class ModelLayerPolicy:
    """How a model is cut into layers, and what the target registry accepts."""

    file_layer_bytes: int = DEFAULT_FILE_LAYER_BYTES
    # The largest layer blob the registry takes (GHCR 10 GB, ECR 52,000 MiB); None: no limit.
    max_layer_bytes: int | None = None

    def file_layers(self, layers_below: int) -> int:
        """How many file layers an image with ``layers_below`` other layers may have."""
        return max(0, min(MAX_FILE_LAYERS, MAX_IMAGE_LAYERS - layers_below - 1))


def push_model_layers(
    registry: RegistryClient,
    repository: str,
    model_dir: Path,
    *,
    policy: ModelLayerPolicy,
    layers_below: int,
    log: LogSink,
    target: str = MODEL_DIR,
    work: Path | None = None,
    on_layer: OnLayer = lambda _outcome: None,
) -> list[ModelLayer]:
    """Write the model's layers to ``repository``: its file layers by path, then the rest.

    ``layers_below``: how many layers the image has under the model (the layer budget). A file
    bigger than the registry's layer limit fails the version before anything is uploaded.
    """
    _refuse_oversized(model_dir, policy, registry.host)
    files = layered_files(
        model_dir,
        min_bytes=policy.file_layer_bytes,
        limit=policy.file_layers(layers_below),
    )
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-layers") as pool:
        rest = pool.submit(
            _rest_layer, registry, repository, model_dir, files, target, work, on_layer
        )
        file_layers = [
            pool.submit(
                _file_layer, registry, repository, model_dir, name, target, work, log, on_layer
            )
            for name in files
        ]
        return [*(job.result() for job in file_layers), rest.result()]


def _refuse_oversized(model_dir: Path, policy: ModelLayerPolicy, host: str) -> None:
    limit = policy.max_layer_bytes
    if limit is None:
        return
    oversized = layered_files(model_dir, min_bytes=limit + 1, limit=1)
    if oversized:
        size = (model_dir / oversized[0]).stat().st_size
        raise PermanentError(
            f"model file '{oversized[0]}' is {_size(size)}, more than the {_size(limit)} a "
            f"layer may have on {host} (MLFLOW_DOCK_MAX_LAYER_MIB); split it into smaller files"
        )


def _file_layer(
    registry: RegistryClient,
    repository: str,
    model_dir: Path,
    name: str,
    target: str,
    work: Path | None,
    log: LogSink,
    on_layer: OnLayer,
) -> ModelLayer:
    started = time.monotonic()
    with FileLayer(model_dir, name, target=target) as layer:
        if compressible(layer.path):
            with tempfile.TemporaryFile(dir=work) as packed:
                digests = layer.write_gzip(packed)
                on_layer("tarred")
                packed.seek(0)
                outcome = _ensure(registry, repository, digests.digest, packed)
            compressed = True
        else:
            digests = layer.digests()
            layer.seek(0)
            outcome = _ensure(registry, repository, digests.digest, cast(IO[bytes], layer))
            compressed = False
    on_layer(outcome)
    how = "gzip" if compressed else "plain tar"
    log(
        f"model file {name} ({_size(layer.file_size)}): layer {digests.digest[:19]} ({how}) "
        + ("already in the registry, not uploaded" if outcome == "present" else "uploaded")
        + f" ({time.monotonic() - started:.1f}s)"
    )
    return ModelLayer(digests.digest, digests.diff_id, digests.size, compressed, name)


def _rest_layer(
    registry: RegistryClient,
    repository: str,
    model_dir: Path,
    files: tuple[str, ...],
    target: str,
    work: Path | None,
    on_layer: OnLayer,
) -> ModelLayer:
    with tempfile.SpooledTemporaryFile(
        max_size=_SPOOL_IN_MEMORY, dir=None if work is None else str(work)
    ) as spool:
        digests = write_model_layer(model_dir, spool, target=target, exclude=files)
        on_layer("tarred")
        spool.seek(0)
        on_layer(_ensure(registry, repository, digests.digest, spool))
    return ModelLayer(digests.digest, digests.diff_id, digests.size)


def _ensure(registry: RegistryClient, repository: str, digest: str, data: IO[bytes]) -> str:
    """ "present" if ``repository`` holds the blob, else uploads it: "uploaded"."""
    if registry.blob_exists(repository, digest):
        return "present"
    registry.upload_blob(repository, data, digest)
    return "uploaded"


def _size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
