"""Registry-side assembly of a model version's image from the previous version's image.

Every version of a model with the same runtime (requirements, base image, Dockerfile) shares all
layers but the last, ``COPY model/ /opt/ml/model/`` (see :mod:`mlflow_dock.build.dockerfile`). As
Jib and crane (``crane mutate``/``crane append``) do, the new image is written straight into the
registry: one new layer blob, one new config blob, one new manifest
(:mod:`mlflow_dock.oci.mutate` computes them); no layer of the previous image is downloaded and
no Docker Engine is involved. :class:`~mlflow_dock.oci.mutate.NotAssemblable` means "build with
the engine instead".
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from mlflow_dock.build.dockerfile import MODEL_DIR
from mlflow_dock.oci.manifest import Manifest
from mlflow_dock.oci.mutate import (
    manifest_document,
    refuse,
    replace_last_layer,
    write_model_layer,
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

# Small models are built, hashed and uploaded without touching the disk; big ones spill over.
_SPOOL_IN_MEMORY: Final = 64 << 20


@dataclass(frozen=True)
class AssembledImage:
    repository: str  # inside the registry, as RegistryClient takes it
    digest: str  # the manifest's: pull as repository@digest
    config_digest: str  # what engines show as the image ID
    layer_digest: str  # the new model layer blob
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
    layer_digest: str
    size: int
    previous_digest: str

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
    registry: RegistryClient, repository: str, reference: str
) -> tuple[Manifest, bytes]:
    try:
        manifest = registry.get_manifest(repository, reference)
        document, _ = manifest_document(manifest, None)
        config = registry.get_blob(repository, str(document["config"].get("digest", "")))
    except RegistryPermanentError as exc:
        if exc.status_code != 404:
            raise
        raise refuse(str(exc)) from exc
    return manifest, config


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
    mtime: int,
) -> Prepared:
    """Upload the new layer and config; the manifest is built but not yet stored."""
    created = created or datetime.now(UTC).isoformat().replace("+00:00", "Z")
    # Small layers stay in memory; a multi-GB model spills to an unnamed temporary file.
    with (
        tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="assemble") as pool,
    ):
        # Tar and gzip locally while the previous manifest and config travel.
        building = pool.submit(write_model_layer, model_dir, spool, target=target, mtime=mtime)
        previous, config = _previous_image(registry, repository, previous_reference)
        layer = building.result()
        rewritten = replace_last_layer(
            previous,
            config,
            layer,
            labels=labels,
            created=created,
            remove_labels=remove_labels,
            require_labels=require_labels,
            target=target,
        )
        spool.seek(0)
        # In parallel: saves the round trips of one upload. On a token registry both may fetch
        # the push token, which costs nothing on the critical path.
        uploads = [
            pool.submit(registry.upload_blob, repository, spool, layer.digest),
            pool.submit(registry.upload_blob, repository, rewritten.config),
        ]
        for upload in uploads:
            upload.result()
    document = json.loads(rewritten.manifest)
    return Prepared(
        repository=repository,
        manifest=Manifest.from_bytes(rewritten.manifest, rewritten.media_type),
        config_digest=document["config"]["digest"],
        layer_digest=layer.digest,
        size=len(rewritten.config) + sum(int(d.get("size", 0)) for d in document["layers"]),
        previous_digest=previous.digest,
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
    mtime: int = 0,
) -> Prepared:
    """Assemble the new version's image in ``repository`` and store it untagged.

    ``previous_reference`` (preferably the digest recorded for the previous version, which no
    one can move) must name an image in the same ``repository`` built from the same runtime:
    same requirements, base image and Dockerfile. Pull ``repository@prepared.digest`` to smoke
    test it, then :func:`publish`. Raises :class:`NotAssemblable` when the previous image
    is missing or unsuitable (fall back to the engine), registry errors otherwise.
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
        mtime=mtime,
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
    mtime: int = 0,
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
        mtime=mtime,
    )
    if tag is None:
        registry.put_manifest_by_digest(repository, prepared.manifest)
        return prepared.image
    return publish(registry, prepared, tag)
