"""Registry-side assembly of a model version's image from the previous version's image.

Every version of a model with the same runtime (requirements, base image, Dockerfile) shares all
layers but its model layers (see :mod:`mlflow_dock.imaging.dockerfile`). As Jib and crane
(``crane mutate``/``crane append``) do, the new image is written straight into the registry: the
model's layers (:mod:`mlflow_dock.imaging.modellayers`: weights a version keeps are already
there, nothing is uploaded for them), one new config blob, one new manifest
(:mod:`mlflow_dock.oci.mutate` computes them); no layer of the previous image is downloaded and
no Docker Engine is involved. :class:`~mlflow_dock.oci.mutate.NotAssemblable` means "build with
the engine instead".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mlflow_dock.imaging.dockerfile import MODEL_DIR
from mlflow_dock.imaging.modellayers import ModelLayerPolicy, push_model_layers
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.oci.manifest import Manifest
from mlflow_dock.oci.mutate import (
    EarlierImage,
    ModelLayer,
    earlier_image,
    manifest_document,
    refuse,
    replace_model_layers,
)
from mlflow_dock.oci.remote import RegistryClient, RegistryPermanentError

__all__ = [
    "AssembledImage",
    "Prepared",
    "Published",
    "assemble",
    "prepare",
    "publish",
    "publish_manifest",
]


@dataclass(frozen=True)
class AssembledImage:
    repository: str  # inside the registry, as RegistryClient takes it
    digest: str  # the manifest's: pull as repository@digest
    config_digest: str  # what engines show as the image ID
    layer_digest: str  # the new layer holding the model's MLmodel (the rest of the model)
    size: int  # compressed bytes of config plus all layers
    media_type: str
    tag: str | None = None
    # Set when the tag already named another image and was left alone (publish_manifest):
    # `digest` is then that image's; config, layer and size describe this run's, untagged.
    note: str | None = None


@dataclass(frozen=True)
class Published:
    """Where a tag points after :func:`publish_manifest`."""

    digest: str
    note: str | None = None  # the tag named another image already and was kept


def publish_manifest(
    registry: RegistryClient, repository: str, tag: str, manifest: Manifest
) -> Published:
    """PUT ``manifest`` under ``tag`` unless the tag already names another image.

    Version tags never move: users pin them, and a job re-run after a lost lease (whose first
    run may have published, then lost the store) must not replace the image they pulled. The
    tag's current digest is read right before the PUT; if it names another image, that image
    stays and is the outcome, with a note saying so (this run's image stays untagged). OCI has
    no conditional PUT, so two publishers racing within one round trip can still both write;
    leases make that a worker that lost its lease and keeps going, whose outcome the store
    then refuses.
    """
    current = registry.manifest_digest(repository, tag)
    if current == manifest.digest:
        return Published(current)  # published already (by this image): nothing to write
    if current is not None:
        return Published(
            current,
            note=(
                f"tag {tag} already pointed at {current}; kept it (version tags never move), "
                f"this run's {manifest.digest} stays untagged"
            ),
        )
    return Published(registry.put_manifest(repository, tag, manifest))


@dataclass(frozen=True)
class Prepared:
    """An assembled image stored under its digest only, waiting for :meth:`tag`."""

    repository: str
    manifest: Manifest = field(repr=False)
    config_digest: str
    layers: tuple[ModelLayer, ...]  # the model's: its file layers, then the rest
    size: int
    previous_digest: str
    # The previous image's model files with layers of their own: path -> layer digest.
    previous_files: dict[str, str] = field(default_factory=dict)

    @property
    def model_files(self) -> dict[str, str]:
        """This image's model files with layers of their own: path -> layer digest."""
        return {layer.file: layer.digest for layer in self.layers if layer.file is not None}

    @property
    def layer_digest(self) -> str:
        """The layer holding the rest of the model (its MLmodel): the last."""
        return self.layers[-1].digest

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def image(self) -> AssembledImage:
        return AssembledImage(
            repository=self.repository,
            digest=self.manifest.digest,
            config_digest=self.config_digest,
            layer_digest=self.layer_digest,
            size=self.size,
            media_type=self.manifest.media_type,
        )


def publish(registry: RegistryClient, prepared: Prepared, tag: str) -> AssembledImage:
    """Point ``tag`` at a prepared image, e.g. once a smoke test of ``repository@digest`` passed.

    Takes the client anew rather than keeping the one that prepared: a smoke test may take
    minutes, longer than a registry token lives. A tag that names another image already is
    kept (:func:`publish_manifest`): the result then describes that image's digest and
    carries a note.
    """
    published = publish_manifest(registry, prepared.repository, tag, prepared.manifest)
    return AssembledImage(
        **{**vars(prepared.image), "tag": tag, "digest": published.digest, "note": published.note}
    )


def _previous_image(
    registry: RegistryClient,
    repository: str,
    reference: str,
    target: str,
    require_labels: Mapping[str, str] | None,
    env_keys: Iterable[str],
) -> tuple[Manifest, EarlierImage]:
    try:
        manifest = registry.get_manifest(repository, reference)
        document, _ = manifest_document(manifest, None)
        config = registry.get_blob(repository, str(document["config"].get("digest", "")))
    except RegistryPermanentError as exc:
        if exc.status_code != 404:
            raise
        raise refuse(str(exc)) from exc
    earlier = earlier_image(
        manifest,
        config,
        target=target,
        require_labels=require_labels,
        media_type=None,
        env_keys=env_keys,
    )
    return manifest, earlier


def _stage(
    registry: RegistryClient,
    repository: str,
    *,
    previous_reference: str,
    model_dir: Path,
    labels: Mapping[str, str],
    created: str | None,
    remove_labels: Iterable[str],
    require_labels: Mapping[str, str] | None,
    target: str,
    policy: ModelLayerPolicy,
    work: Path | None,
    log: LogSink,
    env: Mapping[str, str] | None,
) -> Prepared:
    """Upload the model's layers and the config; the manifest is built but not yet stored.

    The previous image is read and checked first (two small requests), so a refusal comes
    before any upload, and its layer count bounds how many model file layers the image gets.
    """
    created = created or datetime.now(UTC).isoformat().replace("+00:00", "Z")
    env = dict(env or {})
    previous, earlier = _previous_image(
        registry, repository, previous_reference, target, require_labels, env
    )
    layers = push_model_layers(
        registry,
        repository,
        model_dir,
        policy=policy,
        layers_below=earlier.layers_below,
        log=log,
        target=target,
        work=work,
    )
    rewritten = replace_model_layers(
        earlier, layers, labels=labels, created=created, remove_labels=remove_labels, env=env
    )
    registry.upload_blob(repository, rewritten.config)
    document = json.loads(rewritten.manifest)
    return Prepared(
        repository=repository,
        manifest=Manifest.from_bytes(rewritten.manifest, rewritten.media_type),
        config_digest=document["config"]["digest"],
        layers=tuple(layers),
        size=len(rewritten.config) + sum(int(d.get("size", 0)) for d in document["layers"]),
        previous_digest=previous.digest,
        previous_files=earlier.model_files,
    )


def prepare(
    registry: RegistryClient,
    repository: str,
    *,
    previous_reference: str,
    model_dir: Path,
    labels: Mapping[str, str],
    created: str | None = None,
    remove_labels: Iterable[str] = (),
    require_labels: Mapping[str, str] | None = None,
    target: str = MODEL_DIR,
    policy: ModelLayerPolicy | None = None,
    work: Path | None = None,
    log: LogSink = lambda _line: None,
    env: Mapping[str, str] | None = None,
) -> Prepared:
    """Assemble the new version's image in ``repository`` and store it untagged.

    ``previous_reference`` (preferably the digest recorded for the previous version, which no
    one can move) must name an image in the same ``repository`` built from the same runtime:
    same requirements, base image and Dockerfile. Pull ``repository@prepared.digest`` to smoke
    test it, then :func:`publish`. ``env``: the version's own environment (its V2 name and
    version), replacing the previous version's. Raises :class:`NotAssemblable` when the
    previous image is missing or unsuitable (fall back to the engine), registry errors
    otherwise.
    """
    prepared = _stage(
        registry,
        repository,
        previous_reference=previous_reference,
        model_dir=model_dir,
        labels=labels,
        created=created,
        remove_labels=remove_labels,
        require_labels=require_labels,
        target=target,
        policy=policy or ModelLayerPolicy(),
        work=work,
        log=log,
        env=env,
    )
    registry.put_manifest_by_digest(repository, prepared.manifest)
    return prepared


def assemble(
    registry: RegistryClient,
    repository: str,
    *,
    previous_reference: str,
    model_dir: Path,
    labels: Mapping[str, str],
    created: str | None = None,
    tag: str | None = None,
    remove_labels: Iterable[str] = (),
    require_labels: Mapping[str, str] | None = None,
    target: str = MODEL_DIR,
    policy: ModelLayerPolicy | None = None,
    work: Path | None = None,
    log: LogSink = lambda _line: None,
    env: Mapping[str, str] | None = None,
) -> AssembledImage:
    """:func:`prepare` and, with ``tag``, tag in one step (one manifest PUT, by tag)."""
    prepared = _stage(
        registry,
        repository,
        previous_reference=previous_reference,
        model_dir=model_dir,
        labels=labels,
        created=created,
        remove_labels=remove_labels,
        require_labels=require_labels,
        target=target,
        policy=policy or ModelLayerPolicy(),
        work=work,
        log=log,
        env=env,
    )
    if tag is None:
        registry.put_manifest_by_digest(repository, prepared.manifest)
        return prepared.image
    return publish(registry, prepared, tag)
