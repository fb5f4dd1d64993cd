"""KServe Modelcars: each version's model as an OCI image of its own, beside its serving image.

KServe serves a model from an OCI image (``storageUri: oci://...``, a "Modelcar") without
copying it: it runs that image as a sidecar of the predictor, in a pod sharing one process
namespace, with

    sh -c 'ln -sf /proc/$$/root/models /mnt/models && sleep infinity'

(and first, as an init container, ``[ -d /models ] && [ "$(ls -A /models)" ]``), and the
server reads the model through the link. So a Modelcar needs the model under ``/models``,
readable by a non-root user, and ``sh``, ``ln``, ``sleep`` (``ls``, ``mkdir``...). Here it is:

    busybox layer:   bin/busybox (a static build the operator points at, never downloaded),
                     bin/{sh,ln,sleep,ls,...} -> busybox, ``models -> opt/ml/model``, /tmp
    model layer(s):  the serving image's own blobs, whose paths are under opt/ml/model/

so a version's Modelcar costs one config and one manifest: the model blobs are the serving
image's and the busybox blob is the same for every version of every model.

Why ``models`` is a *relative* link: the server follows ``/mnt/models`` to
``/proc/<pid>/root/models``; a relative target is resolved from the link's own directory,
``/proc/<pid>/root``, i.e. inside the Modelcar's file system. An absolute one (``/opt/ml/model``)
would be resolved from the root of the process following it: the server container's own
``/opt/ml/model``, the model baked into its image (or nothing), not the Modelcar's.

Modelcars run as 10001:10001, the user of mlflow-dock's serving images: a process may follow
``/proc/<pid>/root`` only of a process of its own user (the kernel's ptrace access rule), so the
pair works even where KServe's ``uidModelcar`` is not set.

The Modelcar is written after the serving image passed its smoke test and before the version
tag names it (pipeline.py): a Modelcar never names a model that failed, and a version tag
never exists without its Modelcar. It follows the image the version tag names (when the tag
already named another image, that image's model layers) and aliases follow it (runner.py).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from mlflow_dock.errors import ConfigError, PermanentError
from mlflow_dock.imaging import layers as layerlib
from mlflow_dock.imaging.builder import RUNTIME_KEY_LABEL, BuildRequest
from mlflow_dock.imaging.dockerfile import MODEL_DIR, RUNTIME_UID
from mlflow_dock.imaging.elf import read_elf
from mlflow_dock.imaging.layercache import CachedLayer, LayerCache
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.oci.manifest import (
    DOCKER_LAYER,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Manifest,
    digest_matches,
)
from mlflow_dock.oci.mutate import model_layers
from mlflow_dock.oci.reference import modelcar_tag
from mlflow_dock.oci.remote import RegistryClient
from mlflow_dock.serving.layer import SERVE_COMMAND
from mlflow_dock.serving.server.config import MODEL_NAME_ENV

__all__ = [
    "APPLETS",
    "MODELS_LINK",
    "Busybox",
    "BusyboxModelcars",
    "CompanionPublisher",
    "Companions",
    "ImageCompanions",
    "Modelcars",
    "NoCompanions",
    "NoModelcars",
    "ServedImage",
    "busybox_from",
    "modelcar_image",
    "read_served_image",
    "v2_model_of",
]

# What KServe's sidecar and init container run (sh, ln, sleep; [ and echo are shell builtins,
# linked anyway for `docker run <modelcar> ls /models`), plus what its newer releases add.
APPLETS: Final = ("[", "cat", "echo", "ln", "ls", "mkdir", "sh", "sleep", "test")
# `/models` inside the Modelcar: relative, see the module docstring.
MODELS_LINK: Final = MODEL_DIR.lstrip("/")
CREATED_BY: Final = "# mlflow-dock modelcar"
# Which serving image a Modelcar was made from (a label on the Modelcar).
IMAGE_LABEL: Final = "io.mlflow-dock.modelcar.image"
# Platforms by the ELF machine of the busybox binary.
_PLATFORMS: Final = {"x86_64": ("linux", "amd64", None), "aarch64": ("linux", "arm64", None)}


# --------------------------------------------------------------------------- busybox layer


@dataclass(frozen=True)
class Busybox:
    """The Modelcar's own layer: a static busybox, its applet links and ``/models``."""

    data: bytes
    layer: layerlib.LayerDigests
    os: str
    architecture: str
    variant: str | None = None

    @property
    def platform(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def busybox_from(path: Path) -> Busybox:
    """The Modelcar layer around the busybox binary at ``path``; ConfigError if unusable.

    It must be a statically linked ELF executable for a platform images are built for:
    a Modelcar has no C library to load, nor anything else (Debian's ``busybox-static``).
    """
    what = f"MLFLOW_DOCK_MODELCAR_BUSYBOX={path}"
    try:
        binary = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read it ({exc.strerror or exc})") from None
    info = read_elf(path)
    if info is None:
        raise ConfigError(f"{what}: not an ELF executable")
    if info.needed:
        raise ConfigError(
            f"{what}: dynamically linked (needs {', '.join(info.needed)}); a Modelcar has no "
            "C library: use a static build (Debian's busybox-static)"
        )
    platform = _PLATFORMS.get(info.machine)
    if platform is None:
        raise ConfigError(f"{what}: built for {info.machine}, not amd64 or arm64")
    entries = [
        layerlib.Entry("bin", kind=layerlib.DIR, mode=0o755),
        layerlib.Entry("bin/busybox", data=binary, mode=0o755),
        *(
            layerlib.Entry(f"bin/{applet}", kind=layerlib.SYMLINK, linkname="busybox")
            for applet in APPLETS
        ),
        layerlib.Entry("models", kind=layerlib.SYMLINK, linkname=MODELS_LINK),
        # For the link of a `docker run` check (KServe links into its own /mnt volume).
        layerlib.Entry("tmp", kind=layerlib.DIR, mode=0o1777),
    ]
    buffer = io.BytesIO()
    digests = layerlib.write_layer(entries, buffer)
    os_name, architecture, variant = platform
    return Busybox(buffer.getvalue(), digests, os_name, architecture, variant)


# --------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class ServedImage:
    """One platform's serving image as the registry holds it: manifest and config."""

    manifest: Manifest
    document: dict[str, Any]
    config: dict[str, Any]


def v2_model_of(config: Mapping[str, Any]) -> str | None:
    """The V2 model name the image answers to, or None if it does not run mlflow-dock's server.

    Read from the image itself (its command and environment), so it is right whatever built it:
    MLflow's stock image, or one a former release published, answers MLflow's protocol only.
    """
    container = config.get("config") or {}
    if not isinstance(container, dict) or container.get("Entrypoint"):
        return None
    if tuple(container.get("Cmd") or ()) != SERVE_COMMAND:
        return None
    env = dict(str(item).partition("=")[::2] for item in container.get("Env") or [])
    # The server's own default when the image names no model (serving/server/config.py).
    return env.get(MODEL_NAME_ENV) or "model"


def modelcar_image(served: ServedImage, busybox: Busybox) -> tuple[bytes, Manifest] | None:
    """The Modelcar of ``served``: its config and manifest, or None if no layer holds the model
    alone (the image's last layers are not copies into /opt/ml/model).

    Deterministic: the same serving image gives the same Modelcar digest, so writing it again
    (a re-run, an adopted image) changes nothing.
    """
    layers = served.document.get("layers") or []
    picked = model_layers(served.config, layers, MODEL_DIR)
    if not picked:
        return None
    diff_ids = list((served.config.get("rootfs") or {}).get("diff_ids") or [])
    history = [h for h in served.config.get("history") or [] if not h.get("empty_layer")]
    if len(diff_ids) != len(layers) or len(history) != len(layers):
        return None
    container = served.config.get("config") or {}
    labels = {
        key: value
        for key, value in (container.get("Labels") or {}).items()
        if key != RUNTIME_KEY_LABEL  # not a runtime: nothing is ever assembled on it
    }
    labels[IMAGE_LABEL] = served.manifest.digest
    created = served.config.get("created")
    image: dict[str, Any] = {
        "architecture": busybox.architecture,
        "os": busybox.os,
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
            "User": f"{RUNTIME_UID}:{RUNTIME_UID}",
            "Labels": labels,
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": [busybox.layer.diff_id, *(diff_ids[i] for i in picked)],
        },
        "history": [
            {
                "created_by": f"busybox ({', '.join(APPLETS)}), models -> {MODELS_LINK} "
                + CREATED_BY,
            },
            *(copy.deepcopy(history[i]) for i in picked),
        ],
    }
    if created:
        image["created"] = created
        image["history"][0]["created"] = created
    if busybox.variant:
        image["variant"] = busybox.variant
    config = json.dumps(image, separators=(",", ":"), sort_keys=True).encode()
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [
            {"mediaType": OCI_LAYER, "digest": busybox.layer.digest, "size": busybox.layer.size},
            *(_oci_layer(layers[i]) for i in picked),
        ],
    }
    body = json.dumps(document, separators=(",", ":")).encode()
    return config, Manifest.from_bytes(body, OCI_MANIFEST)


def _oci_layer(descriptor: Mapping[str, Any]) -> dict[str, Any]:
    # Docker's gzip layer type and OCI's name the same bytes; an OCI manifest names OCI's.
    media_type = descriptor.get("mediaType", OCI_LAYER)
    return {
        "mediaType": OCI_LAYER if media_type == DOCKER_LAYER else media_type,
        "digest": descriptor["digest"],
        "size": descriptor["size"],
    }


def read_served_image(
    registry: RegistryClient, repository: str, image: Manifest, platform: str | None
) -> ServedImage:
    """``image`` (an index: its ``platform`` entry, else its first) and its config."""
    manifest = image
    document = json.loads(manifest.body)
    if manifest.media_type == OCI_INDEX or "manifests" in document:
        entries = [e for e in document.get("manifests") or [] if isinstance(e, dict)]
        if not entries:
            raise PermanentError(f"image index {repository}@{image.digest} lists no image")
        chosen = next((e for e in entries if _platform_of(e) == platform), entries[0])
        manifest = registry.get_manifest(repository, str(chosen["digest"]))
        document = json.loads(manifest.body)
    config_digest = str((document.get("config") or {}).get("digest", ""))
    raw = registry.get_blob(repository, config_digest)
    if digest_matches(raw, config_digest) is False:
        raise PermanentError(f"config {repository}@{config_digest} does not match its digest")
    return ServedImage(manifest, document, json.loads(raw))


def _platform_of(entry: Mapping[str, Any]) -> str | None:
    described = entry.get("platform")
    if not isinstance(described, dict):
        return None
    variant = described.get("variant")
    text = f"{described.get('os')}/{described.get('architecture')}"
    return text + (f"/{variant}" if variant and variant != "v8" else "")


# --------------------------------------------------------------------------- strategies


class Modelcars(Protocol):
    """Whether and how a version's Modelcar is written (MLFLOW_DOCK_MODELCAR)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def platform(self) -> str | None:
        """The platform Modelcars are made for (whose serving image to read), if any."""
        ...

    def publish(
        self, registry: RegistryClient, repository: str, served: ServedImage, tag: str, log: LogSink
    ) -> str | None:
        """Write the Modelcar of ``served`` under ``tag``; its digest, or None if none."""
        ...


class NoModelcars:
    """MLFLOW_DOCK_MODELCAR=false: no Modelcar is written."""

    enabled = False
    platform = None

    def publish(
        self, registry: RegistryClient, repository: str, served: ServedImage, tag: str, log: LogSink
    ) -> str | None:
        return None


class BusyboxModelcars:
    """Modelcars on the operator's static busybox, sharing the serving image's model blobs.

    The busybox blob is mounted into a repository from one that has it (``cache`` remembers
    where), else uploaded once per repository.
    """

    enabled = True

    def __init__(self, busybox: Busybox, *, cache: LayerCache | None = None) -> None:
        self.busybox = busybox
        self._cache = cache

    @property
    def platform(self) -> str:
        return self.busybox.platform

    def publish(
        self, registry: RegistryClient, repository: str, served: ServedImage, tag: str, log: LogSink
    ) -> str | None:
        busybox = self.busybox
        made = modelcar_image(served, busybox)
        if made is None:
            log(
                "no Modelcar: the image's last layers do not hold the model alone "
                f"(copies into {MODEL_DIR})"
            )
            return None
        config, manifest = made
        self._ensure_busybox(registry, repository, busybox)
        registry.upload_blob(repository, config)
        # A Modelcar is derived data: written anew (the same digest for the same image).
        digest = registry.put_manifest(repository, tag, manifest)
        log(f"Modelcar {repository}:{tag} -> {digest} ({busybox.platform})")
        return digest

    def _ensure_busybox(self, registry: RegistryClient, repository: str, busybox: Busybox) -> None:
        key = hashlib.sha256(f"modelcar-busybox:{busybox.layer.digest}".encode()).hexdigest()
        host = registry.host
        cached = self._cache.get(host, key) if self._cache is not None else None
        mount_from = (
            cached.repository if cached is not None and cached.repository != repository else None
        )
        # Nothing is sent when the blob is there; otherwise a mount is tried first.
        registry.upload_blob(repository, busybox.data, busybox.layer.digest, mount_from=mount_from)
        if self._cache is not None and (cached is None or cached.repository != repository):
            entry = CachedLayer(
                busybox.layer.digest, busybox.layer.diff_id, busybox.layer.size, repository
            )
            self._cache.put(host, key, entry, label="modelcar busybox")


# --------------------------------------------------------------------------- the pipeline's step


@dataclass(frozen=True)
class Companions:
    """What follows a version's image: the V2 name it answers to, its Modelcar."""

    v2_model: str | None = None  # None: the image answers MLflow's protocol only
    modelcar: str | None = None  # "<repository>@sha256:..."


class CompanionPublisher(Protocol):
    """What follows a version's image once it passed its smoke test (pipeline.py, runner.py)."""

    def publish(
        self, request: BuildRequest, image: Manifest | str, *, speaks_v2: bool | None
    ) -> Companions:
        """For ``image`` (a manifest, or a digest in the target repository). ``speaks_v2``: what
        the builder that made it knows (None: an image found in the registry, to be read)."""
        ...


class NoCompanions:
    """Nothing read, nothing written (narrow tests, `mlflow-dock build` without a registry)."""

    def publish(
        self, request: BuildRequest, image: Manifest | str, *, speaks_v2: bool | None
    ) -> Companions:
        return Companions()


class ImageCompanions:
    """The V2 name a version's image answers to, and its Modelcar.

    The registry is only read when something must come from the image itself: its layers for
    a Modelcar, or its command and environment for an image no builder of this run made (an
    adopted one). Otherwise the V2 name is the one the build set (``request.env``).
    """

    def __init__(
        self, *, registry_factory: Callable[[str], RegistryClient], modelcars: Modelcars
    ) -> None:
        self._registry_factory = registry_factory
        self._modelcars = modelcars

    def publish(
        self, request: BuildRequest, image: Manifest | str, *, speaks_v2: bool | None
    ) -> Companions:
        if speaks_v2 is not None and not self._modelcars.enabled:
            name = request.env.get(MODEL_NAME_ENV) if speaks_v2 else None
            return Companions(v2_model=name)
        target = request.target
        with self._registry_factory(target.host) as registry:
            manifest = (
                registry.get_manifest(target.path, image) if isinstance(image, str) else image
            )
            served = read_served_image(registry, target.path, manifest, self._modelcars.platform)
            digest = self._modelcars.publish(
                registry, target.path, served, modelcar_tag(request.tag), request.log
            )
        return Companions(
            v2_model=v2_model_of(served.config),
            modelcar=str(target.with_digest(digest)) if digest else None,
        )
