"""What every builder strategy shares: a build request in, a candidate image out.

As ko's `build.Interface` and `publish.Interface`, the choice of *how* an image is made is a
strategy behind one small protocol, and *publishing* it is another:

    BuildRequest --Builder.build--> Candidate --SmokePolicy.check--> Publisher.publish --> tag

A :class:`Candidate` is an image that exists but that no tag names yet: staged in the registry
(stored by digest, :class:`StagedImage`) or in an engine (a local image, :class:`LocalImage`).
A strategy that cannot build a request raises :class:`NotApplicable` before it writes anything a
user could see, and the next strategy of the fallback order (composed once in ``app.py``) is
tried. Which strategies exist: assembling on an earlier image of the same runtime
(``imaging/previous.py``), the engine-free builder (``imaging/native.py``), the layered
engine build (``imaging/layered.py``) and MLflow's stock Dockerfile (``imaging/stock.py``).

Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.dockerfile import ImageSpec
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.mlflow.client import ModelPackage
from mlflow_dock.oci.manifest import Manifest
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.supply.sbom import KnownContents

__all__ = [
    "RUNTIME_KEY_LABEL",
    "BuildRequest",
    "Builder",
    "Candidate",
    "LocalImage",
    "NotApplicable",
    "StagedImage",
]

# Marks every image with the runtime it was built from: assembly on an earlier image checks it.
RUNTIME_KEY_LABEL = "io.mlflow-dock.runtime-key"

EnterStep = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BuildRequest:
    """One model version to build, with everything derived from its downloaded artifacts."""

    model_name: str
    version: str
    run_id: str | None = None
    source: str | None = None  # the version's MLflow source URI (provenance)
    job_id: str | None = None
    builder: str = ""  # the configured builder, as provenance records it
    target: ImageRef  # the repository its tags go to
    tag: str  # the version tag
    package: ModelPackage
    spec: ImageSpec
    # Build-only inputs (pip.conf, uv.toml, CA bundle) for engine builds; never in an image.
    build_files: Mapping[str, bytes] = field(repr=False)
    runtime_key: str
    labels: Mapping[str, str]
    # The version's part of the image environment (serving.layer.version_env: its V2 name and
    # version), set after the model layer by every builder that runs mlflow-dock's server.
    env: Mapping[str, str] = field(default_factory=dict)
    example: Path | None  # the logged serving input example, for the smoke test
    work: Path  # a private directory, removed after the job
    log: LogSink
    # "The job now enters step NAME" (build, assemble, smoke, push): the worker times steps.
    step: EnterStep = lambda _name: None

    @property
    def runtime_labels(self) -> dict[str, str]:
        return {**self.labels, RUNTIME_KEY_LABEL: self.runtime_key}


@dataclass(frozen=True)
class StagedImage:
    """An image stored in the target repository by digest only, waiting for its tag."""

    manifest: Manifest = field(repr=False)
    # The smoke-tested image this one differs from only in its model layers (assembled on it):
    # the new model can be checked in a warm container of that image instead of a full run.
    tested_on: str | None = None
    # What the builder knows the image holds (its packages, its model layer): the SBOM is
    # written from it in milliseconds instead of reading the layers back. None for an image an
    # engine built.
    contents: KnownContents | None = field(default=None, repr=False)
    # The model's files with a layer of their own (path in the model -> layer digest), this
    # image's and ``tested_on``'s: a warm smoke test reads a file the tested image holds from
    # that image, and copies any other into its container once, not for every version.
    model_files: Mapping[str, str] = field(default_factory=dict, repr=False)
    tested_on_files: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Runs mlflow-dock's server, so it answers the Open Inference Protocol too (every builder's
    # image but MLflow's stock one).
    speaks_v2: bool = True

    @property
    def digest(self) -> str:
        return self.manifest.digest


@dataclass(frozen=True)
class LocalImage:
    """An image the engine built under the version's reference, waiting to be pushed."""

    reference: str
    # Later versions are assembled on this image's runtime, so a warm container is worth
    # starting once it passed (False for MLflow's stock image, which shares no runtime).
    shares_runtime: bool = True
    # Runs mlflow-dock's server (MLflow's stock image does not: MLflow's protocol only).
    speaks_v2: bool = True


Candidate = StagedImage | LocalImage


class NotApplicable(PermanentError):
    """This strategy cannot build the request; nothing was published. The next one may.

    ``hint`` tells the user how to get past it should no strategy be left to try; ``quiet``
    marks the expected case that is not worth a log line (no earlier image to assemble on).
    """

    def __init__(self, reason: str, *, hint: str | None = None, quiet: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        self.quiet = quiet


class Builder(Protocol):
    """One way to make a candidate image of a model version."""

    # How the job log names it: "<description> not possible (...); building with <means>".
    @property
    def description(self) -> str: ...  # "registry assembly", "native build"

    @property
    def means(self) -> str: ...  # "the engine", "the native builder"

    def build(self, request: BuildRequest) -> Candidate:
        """Make the image without tagging it; raise NotApplicable if this way cannot."""
        ...
