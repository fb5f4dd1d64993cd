"""Running one job: a version's build, or an alias's tag set or removed.

``jobs`` knows only the ``Runner`` protocol; :class:`JobRunner` hands each job kind to its own
small handler. A build downloads the version from MLflow, describes it as a
:class:`~mlflow_dock.imaging.builder.BuildRequest` and hands it to the producer the composition
root arranged from the settings (strategies, smoke policy, publisher: see pipeline.py), which
attaches the SBOM, signature and provenance before the tag; a version whose tag a re-run finds
already published is only attached again. Alias jobs only move tags. Nothing here knows
about HTTP or how jobs are scheduled.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.builder import BuildRequest, EnterStep
from mlflow_dock.imaging.dockerfile import (
    ImageSpec,
    PipOptions,
    image_labels,
    requirements_hash,
    runtime_key,
    serving_requirements,
    system_packages_for,
)
from mlflow_dock.imaging.modelcar import CompanionPublisher, NoCompanions
from mlflow_dock.imaging.pipeline import (
    Attacher,
    NoAttachments,
    Producer,
    attach,
    with_companions,
)
from mlflow_dock.imaging.requirements import RequirementsPolicy, checked_requirements
from mlflow_dock.jobs.model import Job, JobKind, JobOutcome, JobState, LogSink
from mlflow_dock.mlflow.client import MlflowSource, ModelPackage, ModelVersionInfo
from mlflow_dock.oci.reference import (
    ImageRef,
    alias_tag,
    image_repository,
    modelcar_tag,
    repository_name,
    service_repository,
    version_tag,
)
from mlflow_dock.oci.remote import RegistryClient
from mlflow_dock.serving.layer import v2_model_name, version_env

__all__ = [
    "AliasHandler",
    "BuildConfig",
    "BuildHandler",
    "JobRunner",
    "UnaliasHandler",
]

RegistryFactory = Callable[[str], RegistryClient]


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What builds need from the settings, resolved once by the composition root."""

    work_dir: Path
    registry: str
    namespace: str
    base_image: str | None = None
    pip_index_url: str | None = None
    pip_extra_index_urls: tuple[str, ...] = ()
    ca_bundle: bytes | None = None
    # What a model's requirements may ask for (imaging/requirements.py); checked once, here.
    requirements: RequirementsPolicy = field(default_factory=RequirementsPolicy)

    def repository_for(self, model_name: str) -> ImageRef:
        """Where a model's images go: host[/prefix][/namespace]/<sanitised model name>."""
        return ImageRef(image_repository(self.registry, self.namespace, model_name))

    def service_repository(self, name: str) -> ImageRef:
        """A repository of mlflow-dock's own beside the models' (a reserved name, see oci)."""
        return ImageRef(service_repository(self.registry, self.namespace, name))


class RepositoryOwners(Protocol):
    """Which model's images a repository already holds (the job history)."""

    def repository_owner(self, repository: str, *, other_than: str) -> str | None: ...


class NoOwners:
    def repository_owner(self, repository: str, *, other_than: str) -> str | None:
        return None


class Builds(Protocol):
    """The job history alias jobs consult: which digest a version's build published."""

    def build_for(self, model_name: str, version: str) -> Job | None: ...


def _no_step(_name: str) -> None:
    return None


def _nothing_to_prepare(_repository: ImageRef) -> None:
    return None


class BuildHandler:
    def __init__(
        self,
        *,
        config: BuildConfig,
        source: MlflowSource,
        registry_factory: RegistryFactory,
        producer: Producer,
        builder_name: str,
        attacher: Attacher | None = None,
        companions: CompanionPublisher | None = None,
        runtime_key_for: Callable[[str], str] = lambda key: key,
        prepare_repository: Callable[[ImageRef], None] = _nothing_to_prepare,
        enter_step: EnterStep = _no_step,
        owners: RepositoryOwners | None = None,
    ) -> None:
        self._config = config
        self._source = source
        # Names that had to be sanitised end in a 40-bit hash: a crafted name could collide
        # with another model's repository; the first model to publish there keeps it.
        self._owners: RepositoryOwners = owners or NoOwners()
        self._registry_factory = registry_factory
        self._producer = producer
        # The configured builder, as provenance records it ("native", "layered", "mlflow").
        self._builder_name = builder_name
        self._attacher: Attacher = attacher or NoAttachments()
        self._companions: CompanionPublisher = companions or NoCompanions()
        # A native runtime has another layout than the engine's from the same inputs.
        self._runtime_key_for = runtime_key_for
        # ECR repositories are created on first use where the operator asked for it.
        self._prepare_repository = prepare_repository
        self._step = enter_step

    def run(self, job: Job, log: LogSink) -> JobOutcome:
        return self.build(job.model_name, job.version, log, work_id=job.id)

    def build(
        self, model_name: str, version: str, log: LogSink, *, work_id: str | None = None
    ) -> JobOutcome:
        target = self._config.repository_for(model_name)
        self._step("resolve")
        if self._owners.repository_owner(target.repository, other_than=model_name) is not None:
            # Not named: the other model's name is another team's business.
            raise PermanentError(
                f"repository {target.repository} already holds images of another model: two "
                "model names map to it (see the naming rule); rename this model"
            )
        info = self._source.get_version(model_name, version)
        log(f"model '{model_name}' version {version}: source {info.source}, run {info.run_id}")
        work = self._config.work_dir / (work_id or uuid.uuid4().hex)
        shutil.rmtree(work, ignore_errors=True)
        try:
            package = self._source.download(model_name, version, work / "download")
            fetched = "read model in place" if package.in_place else "downloaded model"
            log(f"{fetched}, Python {package.python_version}")
            request = self._request(info, package, target, work, log, work_id)
            self._prepare_repository(target)
            adopted = self._already_published(request)
            if adopted is not None:
                # Attached again (idempotently): a version published by an earlier release of
                # mlflow-dock, which attached after tagging, may have died in between; one it
                # published before Modelcars existed gets its Modelcar now.
                return with_companions(
                    attach(self._attacher, request, adopted),
                    self._companions.publish(request, adopted.digest, speaks_v2=None),
                )
            outcome = self._producer.produce(request)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"published {outcome.image}@{outcome.digest}")
        return outcome

    def _request(
        self,
        info: ModelVersionInfo,
        package: ModelPackage,
        target: ImageRef,
        work: Path,
        log: LogSink,
        job_id: str | None,
    ) -> BuildRequest:
        spec, build_files = self._image_spec(package)
        key = runtime_key(spec, ca_bundle=build_files.get("_build/ca-bundle.crt"))
        labels = image_labels(
            model_name=info.name,
            version=info.version,
            run_id=info.run_id,
            source=info.source,
            requirements_digest=requirements_hash(spec.requirements),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return BuildRequest(
            model_name=info.name,
            version=info.version,
            run_id=info.run_id,
            source=info.source,
            job_id=job_id,
            builder=self._builder_name,
            target=target,
            tag=version_tag(info.version),
            package=package,
            spec=spec,
            build_files=build_files,
            runtime_key=self._runtime_key_for(key),
            labels=labels,
            env=version_env(v2_model_name(info.name, repository_name(info.name)), info.version),
            example=(
                package.path / "serving_input_example.json" if package.has_serving_example else None
            ),
            work=work,
            log=log,
            step=self._step,
        )

    def _image_spec(self, package: ModelPackage) -> tuple[ImageSpec, dict[str, bytes]]:
        policy = self._config.requirements
        requirements = serving_requirements(checked_requirements(package.requirements, policy))
        base = self._config.base_image or f"python:{package.python_version}-slim"
        base = base.replace("{python_version}", package.python_version)
        ca_bundle = self._config.ca_bundle
        pip = PipOptions(
            index_url=self._config.pip_index_url,
            extra_index_urls=self._config.pip_extra_index_urls,
            has_ca_bundle=ca_bundle is not None,
            only_binary=policy.wheels_only,
        )
        spec = ImageSpec(
            base_image=base,
            requirements=requirements,
            system_packages=system_packages_for(requirements),
            pip=pip,
        )
        build_files = {
            "_build/pip.conf": pip.pip_conf().encode(),
            "_build/uv.toml": pip.uv_toml().encode(),
        }
        if ca_bundle is not None:
            build_files["_build/ca-bundle.crt"] = ca_bundle
        return spec, build_files

    def _already_published(self, request: BuildRequest) -> JobOutcome | None:
        """The version's image if its tag exists: a re-run never moves a version tag.

        A job re-run after a lost lease (its first run may have pushed and then lost the store)
        adopts what is there instead of publishing a second, different digest.
        """
        target = request.target
        with self._registry_factory(target.host) as registry:
            digest = registry.manifest_digest(target.path, request.tag)
        if digest is None:
            return None
        reference = str(target.with_tag(request.tag))
        request.log(f"{reference} is already published ({digest}); adopting it")
        return JobOutcome(image=reference, digest=digest, tags=(reference,))


class AliasHandler:
    """Point the alias tag at the digest the version's build recorded (a digest no one moves),
    and the alias's Modelcar tag at the version's Modelcar, if it has one."""

    def __init__(
        self,
        *,
        config: BuildConfig,
        builds: Builds,
        registry_factory: RegistryFactory,
        enter_step: EnterStep = _no_step,
    ) -> None:
        self._config = config
        self._builds = builds
        self._registry_factory = registry_factory
        self._step = enter_step

    def run(self, job: Job, log: LogSink) -> JobOutcome:
        assert job.alias is not None
        self._step("tag")
        build = self._builds.build_for(job.model_name, job.version)
        if build is None or build.state is not JobState.SUCCEEDED or not build.digest:
            reason = build.error if build is not None and build.error else "no image was built"
            raise PermanentError(
                f"version {job.version} of '{job.model_name}' has no image: {reason}"
            )
        target = self._config.repository_for(job.model_name)
        tag = alias_tag(job.alias)
        modelcar: str | None = None
        with self._registry_factory(target.host) as registry:
            digest = registry.tag(target.path, build.digest, tag)
            if build.modelcar:
                # By the digest the build recorded, like the image: the alias's Modelcar is
                # always the one of the image its tag names.
                car_tag = modelcar_tag(tag)
                car = registry.tag(target.path, build.modelcar.rpartition("@")[2], car_tag)
                modelcar = str(target.with_digest(car))
                log(f"tagged {target.with_tag(car_tag)} -> {car}")
        reference = str(target.with_tag(tag))
        log(f"tagged {reference} -> {digest}")
        return JobOutcome(
            image=reference,
            digest=digest,
            tags=(reference,),
            modelcar=modelcar,
            v2_model=build.v2_model,
        )


class UnaliasHandler:
    """Remove the alias tag (and its Modelcar's) where the registry can delete a tag without
    its manifest."""

    def __init__(
        self,
        *,
        config: BuildConfig,
        registry_factory: RegistryFactory,
        enter_step: EnterStep = _no_step,
    ) -> None:
        self._config = config
        self._registry_factory = registry_factory
        self._step = enter_step

    def run(self, job: Job, log: LogSink) -> JobOutcome:
        assert job.alias is not None
        self._step("untag")
        target = self._config.repository_for(job.model_name)
        tag = alias_tag(job.alias)
        reference = str(target.with_tag(tag))
        with self._registry_factory(target.host) as registry:
            self._remove_modelcar(registry, target, modelcar_tag(tag), log)
            digest = registry.manifest_digest(target.path, tag)
            if digest is None:
                log(f"{reference} does not exist; nothing to remove")
                return JobOutcome(image=reference, digest="", note="tag did not exist")
            if registry.delete_tag(target.path, tag):
                log(f"removed tag {reference} (was {digest})")
                return JobOutcome(image=reference, digest=digest)
        # Deleting by digest instead would remove the image for every other tag using it.
        note = (
            f"registry {target.host} cannot delete a tag without deleting its manifest, "
            f"which other tags may use; {reference} was left in place"
        )
        log(note)
        return JobOutcome(image=reference, digest=digest, note=note)

    @staticmethod
    def _remove_modelcar(
        registry: RegistryClient, target: ImageRef, tag: str, log: LogSink
    ) -> None:
        if registry.manifest_digest(target.path, tag) is None:
            return
        if registry.delete_tag(target.path, tag):
            log(f"removed tag {target.with_tag(tag)}")
        else:
            log(f"{target.with_tag(tag)} was left in place (the registry cannot delete a tag)")


class Handler(Protocol):
    def run(self, job: Job, log: LogSink) -> JobOutcome: ...


class JobRunner:
    """The ``Runner`` the job machinery calls: each job kind to its own handler."""

    def __init__(self, *, build: BuildHandler, alias: Handler, unalias: Handler) -> None:
        self.builds = build
        self._handlers: dict[JobKind, Handler] = {
            JobKind.BUILD: build,
            JobKind.ALIAS: alias,
            JobKind.UNALIAS: unalias,
        }

    def run(self, job: Job, log: LogSink) -> JobOutcome:
        return self._handlers[job.kind].run(job, log)

    def build(self, model_name: str, version: str, log: LogSink) -> JobOutcome:
        """One version in the foreground (`mlflow-dock build`)."""
        return self.builds.build(model_name, version, log)
