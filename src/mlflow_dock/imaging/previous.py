"""Strategy: assemble the version on an earlier image of the same runtime, in the registry.

When the target repository already holds an image built from the same runtime (same
requirements, base image, pip options, layout), the new version is that image with its model
layers replaced: the model's layers (weights it keeps are already there), a config and a
manifest written straight to the registry (``assembly.py``), no engine, no install. Which
earlier image: the previous version of the same model (:func:`previous_version`), or the image
another build of this runtime published (:func:`remembered_runtime`). Its packages are that
image's, so its SBOM lists them: the new image's SBOM is written from it (``KnownContents``).
Engine-free: never imports the engine client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mlflow_dock.imaging import assembly
from mlflow_dock.imaging.builder import RUNTIME_KEY_LABEL, BuildRequest, NotApplicable, StagedImage
from mlflow_dock.imaging.dockerfile import MODEL_DIR
from mlflow_dock.imaging.modellayers import ModelLayerPolicy
from mlflow_dock.jobs.model import Job
from mlflow_dock.oci.mutate import NotAssemblable
from mlflow_dock.oci.remote import RegistryClient
from mlflow_dock.supply.sbom import KnownContents

__all__ = ["AssembleOnEarlier", "Earlier", "previous_version", "remembered_runtime"]


@dataclass(frozen=True)
class Earlier:
    """An image of the same runtime already in the target repository, to assemble on."""

    label: str  # how the log names it ("version 3's layers")
    digest: str  # recorded by the build that published it: a digest no one can move


FindEarlier = Callable[[BuildRequest], Earlier | None]


class EarlierVersions(Protocol):
    def latest_image(
        self, model_name: str, *, repository: str, exclude_version: str
    ) -> Job | None: ...


class PublishedRuntimes(Protocol):
    def runtime_image(self, key: str, repository: str) -> str | None: ...


def previous_version(history: EarlierVersions) -> FindEarlier:
    """The newest published version of the same model in the same repository."""

    def find(request: BuildRequest) -> Earlier | None:
        job = history.latest_image(
            request.model_name,
            repository=request.target.repository,
            exclude_version=request.version,
        )
        if job is None or job.digest is None:
            return None
        return Earlier(f"version {job.version}'s layers", job.digest)

    return find


def remembered_runtime(memory: PublishedRuntimes) -> FindEarlier:
    """The image of this runtime that a build (of any model) published to the repository."""

    def find(request: BuildRequest) -> Earlier | None:
        digest = memory.runtime_image(request.runtime_key, request.target.repository)
        return None if digest is None else Earlier("an earlier image of the same runtime", digest)

    return find


class AssembleOnEarlier:
    description = "registry assembly"
    means = "an earlier image of the same runtime"

    def __init__(
        self,
        find: FindEarlier,
        *,
        registry_factory: Callable[[str], RegistryClient],
        model_layers: ModelLayerPolicy | None = None,
    ) -> None:
        self._find = find
        self._registry_factory = registry_factory
        self._model_layers = model_layers or ModelLayerPolicy()

    def build(self, request: BuildRequest) -> StagedImage:
        earlier = self._find(request)
        if earlier is None:
            raise NotApplicable("no earlier image of this runtime", quiet=True)
        request.step("assemble")
        target = request.target
        with self._registry_factory(target.host) as registry:
            try:
                staged = assembly.prepare(
                    registry,
                    target.path,
                    previous_reference=earlier.digest,
                    model_dir=request.package.path,
                    labels=request.labels,
                    require_labels={RUNTIME_KEY_LABEL: request.runtime_key},
                    target=MODEL_DIR,
                    policy=self._model_layers,
                    work=request.work,
                    log=request.log,
                    # This version's V2 name and version, not the earlier image's.
                    env=request.env,
                )
            except NotAssemblable as exc:
                raise NotApplicable(str(exc)) from exc
        request.log(
            f"assembled {target.repository}@{staged.digest} in the registry on top of "
            f"{earlier.label}"
        )
        return StagedImage(
            staged.manifest,
            tested_on=earlier.digest,
            contents=KnownContents(model_layer=staged.layer_digest, packages_of=earlier.digest),
            model_files=staged.model_files,
            tested_on_files=staged.previous_files,
        )
