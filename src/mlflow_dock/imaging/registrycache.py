"""The registry as the shared layer cache: one small OCI artifact per layer content key.

The job store's ``native_layers`` table remembers which blob a layer became, but only for the
workers that share that database. A fresh worker, a new pod with its own SQLite, or a new
installation would pack and upload numpy again although the registry holds it in a dozen
repositories. So, as BuildKit's registry cache (``--cache-to type=registry,image-manifest=true``)
keeps its cache as an image manifest beside the images, every worker that packs a shared layer
also leaves, in a repository of the service's own (``mlflow-dock-cache``, a reserved name no
model maps onto, see oci/reference.py):

* the layer blob, mounted from the repository it was pushed to;
* a manifest tagged ``<codec>-<content key>`` (``gzip-3f5a...``): an OCI 1.1 artifact
  (``artifactType`` below, the empty config) whose one layer descriptor names that blob, with
  the layer's diff_id and the content key as annotations.

Any worker then finds a layer by its content key with one GET, and mounts the blob from the
cache repository into its target: no packing, no upload. Lookups run in the builder's I/O
threads, many at once. The manifest keeps the blob referenced, so registry garbage collection
keeps it; deleting the cache repository is safe (the next builds pack and push again).

Layers of a base image on another registry (python:3.11-slim on Docker Hub) are copied through
the worker once per registry: they are kept in the cache repository under ``base-<digest>``
(the base manifest's digest; the blobs are addressed by their own digests) and mounted from
there by every later image.

Why a tag lookup here is trusted (SECURITY.md, "Content-keyed caches"): the repository is
reserved, so no model's name and no alias can write to it, only the service's own credentials,
which can overwrite any image anyway; and the tag is a content key, so a model's build can only
ever publish the layer of what it really installed, under the key of exactly that content.
Entries that do not look like this module's own are ignored (a miss), never half-trusted.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from mlflow_dock.imaging.layercache import CachedLayer
from mlflow_dock.imaging.layers import LayerCodec
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.oci.manifest import OCI_MANIFEST, Manifest
from mlflow_dock.oci.reference import TAG_RE, ImageRef, is_digest
from mlflow_dock.oci.remote import RegistryClient, RegistryError, RegistryPermanentError

__all__ = [
    "ARTIFACT_TYPE",
    "CACHE_REPOSITORY",
    "NoSharedLayers",
    "RegistryLayerCache",
    "SharedLayers",
    "base_name",
    "layer_entry",
    "layer_tag",
    "read_layer_entry",
]

logger = logging.getLogger(__name__)

CACHE_REPOSITORY: Final = "mlflow-dock-cache"
ARTIFACT_TYPE: Final = "application/vnd.mlflow-dock.layer-cache.v1"
# OCI 1.1's empty descriptor: the config of an artifact that has none.
EMPTY_TYPE: Final = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG: Final = b"{}"
EMPTY_DIGEST: Final = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
KEY_ANNOTATION: Final = "io.mlflow-dock.cache.key"
DIFF_ID_ANNOTATION: Final = "io.mlflow-dock.layer.diff-id"
CONTENT_ANNOTATION: Final = "io.mlflow-dock.layer.content"
_HEX64_LENGTH: Final = 64
_MAX_LABEL: Final = 1024


# --------------------------------------------------------------------------- entries (pure)


def layer_tag(key: str, codec: LayerCodec) -> str:
    """``gzip-<key>``: per codec, since a client that reads gzip may not read zstd."""
    return f"{codec.name}-{key}"


def base_name(manifest_digest: str) -> str:
    """The tag keeping a foreign base image's layers: ``base-<hex of its manifest digest>``."""
    return "base-" + manifest_digest.partition(":")[2]


def _artifact(layers: Sequence[dict[str, Any]], annotations: dict[str, str]) -> Manifest:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_CONFIG)},
        "layers": list(layers),
        "annotations": annotations,
    }
    # Compact and in a fixed order: the same entry is the same bytes from every worker.
    return Manifest.from_bytes(json.dumps(document, separators=(",", ":")).encode(), OCI_MANIFEST)


def layer_entry(key: str, codec: LayerCodec, layer: CachedLayer, *, label: str) -> Manifest:
    """The cache manifest of one layer: its blob, diff_id and content key."""
    descriptor = {
        "mediaType": codec.media_type,
        "digest": layer.digest,
        "size": layer.size,
        "annotations": {DIFF_ID_ANNOTATION: layer.diff_id, CONTENT_ANNOTATION: label[:_MAX_LABEL]},
    }
    return _artifact([descriptor], {KEY_ANNOTATION: key})


def read_layer_entry(body: bytes, key: str, codec: LayerCodec) -> tuple[str, str, int] | None:
    """(digest, diff_id, size) from a cache manifest, or None unless it is exactly ours."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("artifactType") != ARTIFACT_TYPE:
        return None
    if (document.get("annotations") or {}).get(KEY_ANNOTATION) != key:
        return None
    layers = document.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        return None
    layer = layers[0]
    digest, size = layer.get("digest"), layer.get("size")
    annotations = layer.get("annotations")
    diff_id = annotations.get(DIFF_ID_ANNOTATION) if isinstance(annotations, dict) else None
    if (
        layer.get("mediaType") != codec.media_type
        or not isinstance(digest, str)
        or not is_digest(digest)
        or not isinstance(diff_id, str)
        or not is_digest(diff_id)
        or not isinstance(size, int)
        or isinstance(size, bool)
        or size < 0
    ):
        return None
    return digest, diff_id, size


# --------------------------------------------------------------------------- strategies


class SharedLayers(Protocol):
    """Layers and blobs any worker left in the target registry, for every other worker."""

    def find(
        self, registry: RegistryClient, key: str, codec: LayerCodec, log: LogSink
    ) -> CachedLayer | None:
        """The layer with content key ``key`` compressed by ``codec``, if a worker pushed it."""
        ...

    def publish(
        self,
        registry: RegistryClient,
        key: str,
        codec: LayerCodec,
        layer: CachedLayer,
        *,
        label: str,
        data: Path | bytes,
        log: LogSink,
    ) -> None:
        """Make ``layer`` (just pushed to ``layer.repository``) findable by ``key``; best effort.

        ``data`` is the blob, uploaded only where the registry declines to mount it.
        """
        ...

    def kept(self, registry: RegistryClient, name: str) -> bool:
        """Whether :meth:`keep` kept blobs under ``name`` (then :meth:`mount` finds them)."""
        ...

    def mount(self, registry: RegistryClient, repository: str, digest: str) -> bool:
        """Mount blob ``digest`` from the cache into ``repository``; False if that failed."""
        ...

    def keep(
        self,
        registry: RegistryClient,
        name: str,
        layers: Sequence[dict[str, Any]],
        *,
        repository: str,
        log: LogSink,
    ) -> None:
        """Keep the blobs ``layers`` describe (now in ``repository``) under ``name``."""
        ...


class NoSharedLayers:
    """MLFLOW_DOCK_REGISTRY_LAYER_CACHE=false: only this deployment's own memory."""

    def find(
        self, registry: RegistryClient, key: str, codec: LayerCodec, log: LogSink
    ) -> CachedLayer | None:
        return None

    def publish(
        self,
        registry: RegistryClient,
        key: str,
        codec: LayerCodec,
        layer: CachedLayer,
        *,
        label: str,
        data: Path | bytes,
        log: LogSink,
    ) -> None:
        return None

    def kept(self, registry: RegistryClient, name: str) -> bool:
        return False

    def mount(self, registry: RegistryClient, repository: str, digest: str) -> bool:
        return False

    def keep(
        self,
        registry: RegistryClient,
        name: str,
        layers: Sequence[dict[str, Any]],
        *,
        repository: str,
        log: LogSink,
    ) -> None:
        return None


class RegistryLayerCache:
    """:class:`SharedLayers` in the reserved repository ``repository`` of the target registry.

    Failures never fail a build: a lookup that fails is a miss (the layer is packed), a publish
    that fails is logged. A registry that refuses writes to the cache repository (no permission,
    an ECR repository nobody created) is told about once per process, then left alone.
    """

    def __init__(
        self,
        repository: ImageRef,
        *,
        prepare_repository: Callable[[ImageRef], None] = lambda _repository: None,
    ) -> None:
        self.repository = repository
        self._prepare_repository = prepare_repository
        self._lock = threading.Lock()
        self._prepared = False
        self._refused: str | None = None  # why writes are off for this process
        self._warned: set[str] = set()

    @property
    def path(self) -> str:
        return self.repository.path

    def find(
        self, registry: RegistryClient, key: str, codec: LayerCodec, log: LogSink
    ) -> CachedLayer | None:
        tag = layer_tag(key, codec)
        if len(key) != _HEX64_LENGTH or not TAG_RE.fullmatch(tag):
            return None
        try:
            manifest = registry.get_manifest(self.path, tag)
        except RegistryPermanentError as exc:
            if exc.status_code != 404:
                self._warn_once(f"lookup {exc.status_code}", f"layer cache lookup failed: {exc}")
            return None
        except RegistryError as exc:
            self._warn_once("lookup", f"layer cache lookup failed: {exc}")
            return None
        found = read_layer_entry(manifest.body, key, codec)
        if found is None:
            return None
        digest, diff_id, size = found
        return CachedLayer(digest, diff_id, size, self.path)

    def publish(
        self,
        registry: RegistryClient,
        key: str,
        codec: LayerCodec,
        layer: CachedLayer,
        *,
        label: str,
        data: Path | bytes,
        log: LogSink,
    ) -> None:
        if not self._writable(log):
            return
        entry = layer_entry(key, codec, layer, label=label)
        try:
            self._hold(registry, layer.digest, layer.repository, data)  # data: never False
            registry.upload_blob(self.path, EMPTY_CONFIG, EMPTY_DIGEST)
            registry.put_manifest(self.path, layer_tag(key, codec), entry)
        except RegistryError as exc:
            self._failed(exc, log)

    def kept(self, registry: RegistryClient, name: str) -> bool:
        try:
            return registry.manifest_digest(self.path, name) is not None
        except RegistryError as exc:
            self._warn_once("kept", f"layer cache lookup failed: {exc}")
            return False

    def mount(self, registry: RegistryClient, repository: str, digest: str) -> bool:
        if repository == self.path:
            return False
        try:
            return registry.mount_blob(repository, digest, self.path)
        except RegistryError:
            return False

    def keep(
        self,
        registry: RegistryClient,
        name: str,
        layers: Sequence[dict[str, Any]],
        *,
        repository: str,
        log: LogSink,
    ) -> None:
        if not self._writable(log):
            return
        try:
            for layer in layers:
                if not self._hold(registry, str(layer["digest"]), repository, None):
                    log(f"layer cache: {self.repository} declined to mount from {repository}")
                    return
            registry.upload_blob(self.path, EMPTY_CONFIG, EMPTY_DIGEST)
            registry.put_manifest(self.path, name, _artifact(layers, {}))
        except RegistryError as exc:
            self._failed(exc, log)

    # -- helpers ----------------------------------------------------------------------------

    def _hold(
        self, registry: RegistryClient, digest: str, source: str, data: Path | bytes | None
    ) -> bool:
        """Make the cache repository hold blob ``digest``: mounted from ``source``, else
        uploaded from ``data``; False if neither was possible."""
        if source != self.path and registry.mount_blob(self.path, digest, source):
            return True
        if data is None:
            return registry.blob_exists(self.path, digest)
        registry.upload_blob(self.path, data, digest)
        return True

    def _writable(self, log: LogSink) -> bool:
        with self._lock:
            if self._refused is not None:
                return False
            if self._prepared:
                return True
        try:
            # ECR with MLFLOW_DOCK_ECR_CREATE_REPOSITORIES: create the repository once.
            self._prepare_repository(self.repository)
        except Exception as exc:  # a cloud API error: the cache is an optimisation only
            self._refuse(f"could not prepare {self.repository}: {exc}", log)
            return False
        with self._lock:
            self._prepared = True
        return True

    def _failed(self, exc: RegistryError, log: LogSink) -> None:
        if isinstance(exc, RegistryPermanentError) and exc.status_code in (401, 403, 404):
            self._refuse(f"{self.repository} refuses writes: {exc}", log)
        else:
            log(f"layer cache: could not publish to {self.repository}: {exc}")

    def _refuse(self, reason: str, log: LogSink) -> None:
        with self._lock:
            first = self._refused is None
            self._refused = reason
        if first:
            message = f"layer cache off until restart ({reason}); layers are not shared"
            log(message)
            logger.warning(message)

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logger.warning("%s (%s); such lookups count as misses", message, self.repository)
