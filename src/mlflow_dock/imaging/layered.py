"""Strategy: the layered engine build (MLFLOW_DOCK_BUILDER=layered, and the native fallback).

The runtime (base, OS packages, the model's requirements and the model server: everything but
the model, see dockerfile.py) is built once per runtime key and kept in the engine as
``mlflow-dock-runtime:<key>``; each version's image is ``FROM`` it plus one ``COPY`` of the
model and the version's V2 name and version (``ENV``), built under the version's reference and
pushed by the publisher.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlflow_dock.imaging.builder import (
    RUNTIME_KEY_LABEL,
    Builder,
    BuildRequest,
    Candidate,
    LocalImage,
    NotApplicable,
)
from mlflow_dock.imaging.dockerfile import (
    render_model_dockerfile,
    render_runtime_dockerfile,
    serving_context_files,
)
from mlflow_dock.imaging.engine import DockerEngine, EngineTransfers

__all__ = ["RUNTIME_REPOSITORY", "EngineRequired", "LayeredBuilder"]

# Local-only images holding everything but a model; never pushed under this name.
RUNTIME_REPOSITORY = "mlflow-dock-runtime"


class LayeredBuilder:
    description = "engine build"
    means = "the engine"

    def __init__(self, engine: DockerEngine, *, timeout_seconds: int) -> None:
        self._engine = engine
        self._timeout = timeout_seconds

    def build(self, request: BuildRequest) -> LocalImage:
        request.step("build")
        runtime = self._ensure_runtime(request, request.work / "runtime")
        context = request.work / "image"
        context.mkdir(parents=True)
        (context / "Dockerfile").write_text(
            render_model_dockerfile(runtime, request.labels, request.env)
        )
        # Linked, not moved: the smoke test and the SBOM still read the downloaded artifacts.
        shutil.copytree(request.package.path, context / "model", copy_function=_link_or_copy)
        reference = str(request.target.with_tag(request.tag))
        self._engine.build(
            context,
            extra_files={},
            tag=reference,
            labels={},
            log=request.log,
            timeout=self._timeout,
        )
        return LocalImage(reference)

    def _ensure_runtime(self, request: BuildRequest, context: Path) -> str:
        """The local runtime image for the spec, built only if this engine does not have it."""
        key, log = request.runtime_key, request.log
        reference = f"{RUNTIME_REPOSITORY}:{key[:40]}"
        if self._engine.image_exists(reference):
            log(f"reusing runtime image {reference}")
            return reference
        log(f"building runtime image {reference} (new requirements or first build here)")
        context.mkdir(parents=True)
        (context / "Dockerfile").write_text(render_runtime_dockerfile(request.spec))
        (context / "requirements.txt").write_text(request.spec.requirements)
        self._engine.build(
            context,
            # The server's files from memory, as the build inputs: the same bytes the native
            # builder packs, whatever is on this worker's disk.
            extra_files={**request.build_files, **serving_context_files(request.spec)},
            tag=reference,
            labels={RUNTIME_KEY_LABEL: key},
            log=log,
            timeout=self._timeout,
        )
        return reference


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed: a copy does as well
        shutil.copy2(source, destination)


class EngineRequired:
    """An engine strategy as a fallback: not applicable when no engine (Docker, Podman) answers.

    Where the engine builder is the configured one, an engine that is down is a transient
    failure instead (its jobs wait for it); this wrapper is only composed into fallbacks.
    """

    def __init__(self, builder: Builder, engine: EngineTransfers) -> None:
        self._builder = builder
        self._engine = engine

    @property
    def description(self) -> str:
        return self._builder.description

    @property
    def means(self) -> str:
        return self._builder.means

    def build(self, request: BuildRequest) -> Candidate:
        if not self._engine.reachable():
            raise NotApplicable("no Docker Engine or Podman answers", quiet=True)
        return self._builder.build(request)
