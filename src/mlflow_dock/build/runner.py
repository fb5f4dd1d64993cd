"""Running one job: MLflow model -> image -> smoke test -> registry; or alias -> tag.

This module composes the pieces (MLflow source, Docker Engine, registry client) and knows
nothing about HTTP or how jobs are scheduled; a Celery task would call `JobRunner.run` too.

A version reaches the registry one of two ways:
- fast path: when the registry already holds an earlier version built from the same runtime
  (same requirements, base image, pip options, Dockerfile), the new image is assembled in the
  registry: one new model layer on the earlier version's layers, no engine build, no push;
- engine path: otherwise the runtime image is built (once per runtime key, then reused), the
  version image is `FROM` it plus the model, and it is pushed.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from mlflow_dock.build import assembly, ospackages, stock
from mlflow_dock.build.baseimage import BaseImage
from mlflow_dock.build.dockerfile import (
    MODEL_DIR,
    ImageSpec,
    PipOptions,
    image_labels,
    render_model_dockerfile,
    render_runtime_dockerfile,
    requirements_hash,
    runtime_key,
    serving_requirements,
    system_packages_for,
)
from mlflow_dock.build.engine import DockerEngine, PushResult, with_fresh_credentials
from mlflow_dock.build.native import (
    NativeBuilder,
    NativeNotApplicable,
    base_reference,
    native_runtime_key,
)
from mlflow_dock.build.smoke import SmokeTester
from mlflow_dock.build.warm import WarmSmoke
from mlflow_dock.cloud.credentials import CredentialProvider
from mlflow_dock.cloud.ecr import EcrRepositories
from mlflow_dock.errors import PermanentError
from mlflow_dock.jobs.model import Job, JobKind, JobOutcome, JobState, LogSink
from mlflow_dock.mlflow.client import MlflowSource, ModelPackage, ModelVersionInfo
from mlflow_dock.oci.mutate import NotAssemblable
from mlflow_dock.oci.reference import ImageRef, alias_tag, image_repository, version_tag
from mlflow_dock.oci.remote import RegistryClient
from mlflow_dock.supply.attach import SupplyChain

RUNTIME_KEY_LABEL = "io.mlflow-dock.runtime-key"


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What the runner needs from the settings, resolved once by the composition root."""

    work_dir: Path
    registry: str
    namespace: str
    builder: Literal["layered", "mlflow", "native"] = "layered"
    # native: build with the engine when the native builder cannot (no wheel, missing library)
    engine_fallback: bool = True
    base_image: str | None = None
    pip_index_url: str | None = None
    pip_extra_index_urls: tuple[str, ...] = ()
    ca_bundle: bytes | None = None
    build_timeout_seconds: int = 1800
    ecr_create_repositories: bool = False

    def repository_for(self, model_name: str) -> ImageRef:
        """Where a model's images go: host[/prefix][/namespace]/<sanitised model name>."""
        return ImageRef(image_repository(self.registry, self.namespace, model_name))


class History(Protocol):
    """The job history the runner consults: earlier images to assemble on, builds for aliases."""

    def latest_image(
        self, model_name: str, *, repository: str, exclude_version: str
    ) -> Job | None: ...

    def build_for(self, model_name: str, version: str) -> Job | None: ...

    def runtime_image(self, key: str, repository: str) -> str | None:
        """The digest of an image of runtime `key` published to `repository`, if any."""
        ...

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None: ...


# Local-only images holding everything but a model; never pushed under this name.
RUNTIME_REPOSITORY = "mlflow-dock-runtime"

RegistryFactory = Callable[[str], RegistryClient]

# A base image on another registry than the target (the default python:X.Y-slim on Docker Hub)
# is read anonymously (the target's credentials are not that registry's business) and with a
# short timeout: a machine that cannot reach it goes to the engine fallback in seconds.
BASE_REGISTRY_TIMEOUT = 10.0


def anonymous_registry(host: str) -> RegistryClient:
    return RegistryClient(host, timeout=BASE_REGISTRY_TIMEOUT)


class RuntimeLocks(Protocol):
    """Deployment-wide mutual exclusion: one worker builds a given runtime at a time."""

    def hold(self, name: str) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class _Previous:
    """An image of the same runtime already in the target repository, to assemble on."""

    label: str  # how the log names it ("version 3")
    digest: str


@dataclass
class _Prepared:
    """A downloaded version and everything derived from it, shared by both paths."""

    package: ModelPackage
    spec: ImageSpec
    extra_files: dict[str, bytes]
    key: str
    labels: dict[str, str]
    example: Path | None


class JobRunner:
    def __init__(
        self,
        *,
        config: BuildConfig,
        history: History,
        source: MlflowSource,
        engine: DockerEngine,
        credentials: CredentialProvider,
        registry_factory: RegistryFactory,
        smoke: SmokeTester | None,
        runtime_locks: RuntimeLocks | None = None,
        supply: SupplyChain | None = None,
        ecr: EcrRepositories | None = None,
        enter_step: Callable[[str], None] = lambda _name: None,
        native: NativeBuilder | None = None,
        warm: WarmSmoke | None = None,
        base_registry_factory: RegistryFactory = anonymous_registry,
    ) -> None:
        self._config = config
        self._base_registry_factory = base_registry_factory
        # MLFLOW_DOCK_BUILDER=native: images assembled from wheels in the registry (native.py).
        self._native = native if config.builder == "native" else None
        # Second and later versions of a runtime: smoke-tested in a warm container (warm.py).
        self._warm = warm
        # "The job now enters step NAME" (resolve, assemble, build, smoke, push, tag, untag):
        # the worker times steps and attributes failures with it.
        self._step = enter_step
        self._history = history
        self._source = source
        self._engine = engine
        self._credentials = credentials
        self._registry_factory = registry_factory
        self._smoke = smoke
        self._runtime_locks_shared = runtime_locks
        # SBOM, signature and provenance for every published version (supply/attach.py).
        self._supply = supply
        # ECR's own API for what OCI cannot do there (create repositories, delete one tag).
        self._ecr = ecr
        self._work_dir = config.work_dir
        self._locks_guard = threading.Lock()
        self._runtime_locks: dict[str, threading.Lock] = {}

    def run(self, job: Job, log: LogSink) -> JobOutcome:
        if job.kind is JobKind.BUILD:
            return self.build(job.model_name, job.version, log, work_id=job.id)
        if job.kind is JobKind.UNALIAS:
            return self._unalias(job, log)
        return self._alias(job, log)

    # -- builds -------------------------------------------------------------------------------

    def build(
        self, model_name: str, version: str, log: LogSink, *, work_id: str | None = None
    ) -> JobOutcome:
        target = self._config.repository_for(model_name)
        self._step("resolve")
        info = self._source.get_version(model_name, version)
        log(f"model '{model_name}' version {version}: source {info.source}, run {info.run_id}")
        work = self._work_dir / (work_id or uuid.uuid4().hex)
        shutil.rmtree(work, ignore_errors=True)
        try:
            package = self._source.download(model_name, version, work / "download")
            log(f"downloaded model, Python {package.python_version}")
            spec, extra_files = self._image_spec(package)
            key = runtime_key(spec, ca_bundle=extra_files.get("_build/ca-bundle.crt"))
            if self._native is not None:
                key = native_runtime_key(key, self._native.platforms)
            labels = image_labels(
                model_name=model_name,
                version=version,
                run_id=info.run_id,
                source=info.source,
                requirements_digest=requirements_hash(spec.requirements),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            example = package.path / "serving_input_example.json"
            prepared = _Prepared(
                package,
                spec,
                extra_files,
                key,
                labels,
                example if package.has_serving_example else None,
            )
            self._ensure_repository(target)
            if (adopted := self._already_published(target, version, log)) is not None:
                # Attached again (idempotently): the first run may have published, then died.
                return self._attach(target, adopted, info, prepared, work_id, log)
            outcome: JobOutcome | None
            if self._config.builder == "mlflow":
                # MLflow's stock image shares no runtime layers, so there is nothing to assemble.
                outcome = self._build_stock(target, version, prepared, work, log)
            else:
                outcome = self._assemble_in_registry(target, model_name, version, prepared, log)
            if outcome is None:
                outcome = self._build_runtime(target, model_name, version, prepared, work, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        outcome = self._attach(target, outcome, info, prepared, work_id, log)
        log(f"published {outcome.image}@{outcome.digest}")
        return outcome

    def _attach(
        self,
        target: ImageRef,
        outcome: JobOutcome,
        info: ModelVersionInfo,
        prepared: _Prepared,
        work_id: str | None,
        log: LogSink,
    ) -> JobOutcome:
        """SBOM, signature and provenance for a published version (supply/attach.py)."""
        if self._supply is None:
            return outcome
        return self._supply.attach(
            target,
            outcome,
            log,
            model_name=info.name,
            model_version=info.version,
            run_id=info.run_id,
            model_source=info.source,
            requirements_sha256=requirements_hash(prepared.spec.requirements),
            base_image=prepared.spec.base_image,
            builder=self._config.builder,
            job_id=work_id,
        )

    def _image_spec(self, package: ModelPackage) -> tuple[ImageSpec, dict[str, bytes]]:
        requirements = serving_requirements(package.requirements)
        base = self._config.base_image or f"python:{package.python_version}-slim"
        base = base.replace("{python_version}", package.python_version)
        ca_bundle = self._config.ca_bundle
        pip = PipOptions(
            index_url=self._config.pip_index_url,
            extra_index_urls=self._config.pip_extra_index_urls,
            has_ca_bundle=ca_bundle is not None,
        )
        spec = ImageSpec(
            base_image=base,
            requirements=requirements,
            system_packages=system_packages_for(requirements),
            pip=pip,
        )
        extra = {
            "_build/pip.conf": pip.pip_conf().encode(),
            "_build/uv.toml": pip.uv_toml().encode(),
        }
        if ca_bundle is not None:
            extra["_build/ca-bundle.crt"] = ca_bundle
        return spec, extra

    def _ensure_repository(self, target: ImageRef) -> None:
        if self._config.ecr_create_repositories and self._ecr is not None:
            self._ecr.ensure_repository(target.path)

    # -- fast path: assemble in the registry -------------------------------------------------

    def _build_runtime(
        self,
        target: ImageRef,
        model_name: str,
        version: str,
        prepared: _Prepared,
        work: Path,
        log: LogSink,
    ) -> JobOutcome:
        """A version with no earlier version of its runtime to assemble on.

        One build per runtime at a time: concurrent versions needing the same new runtime (on
        this worker or, through the store's named lease, on any other) wait for the one
        building it, then assemble on what it published instead of installing the same
        requirements again. Only the build holds the lock, not the assemblies after it.
        """
        built = self._history.runtime_image(prepared.key, target.repository)
        if built is None:
            with self._runtime_lock(prepared.key):
                # Whoever held the lock before may have published this runtime meanwhile.
                built = self._history.runtime_image(prepared.key, target.repository)
                if built is None:
                    return self._publish_new_runtime(target, version, prepared, work, log)
        previous = _Previous("an earlier image of the same runtime", built)
        outcome = self._assemble_in_registry(
            target, model_name, version, prepared, log, previous=previous
        )
        if outcome is not None:
            return outcome
        with self._runtime_lock(prepared.key):
            return self._publish_new_runtime(target, version, prepared, work, log)

    def _publish_new_runtime(
        self, target: ImageRef, version: str, prepared: _Prepared, work: Path, log: LogSink
    ) -> JobOutcome:
        outcome = None
        if self._native is not None:
            outcome = self._build_native(target, version, prepared, work, log)
        if outcome is None:
            outcome = self._build_with_engine(target, version, prepared, work, log)
        # Before the lock is let go: the builds waiting for it read this, not this job's
        # outcome, which is only recorded after the runner returns.
        self._history.remember_runtime_image(prepared.key, target.repository, outcome.digest)
        return outcome

    @contextmanager
    def _runtime_lock(self, key: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._runtime_locks.setdefault(key, threading.Lock())
        shared = self._runtime_locks_shared
        with lock, shared.hold(f"runtime:{key}") if shared else nullcontext():
            yield

    def _assemble_in_registry(
        self,
        target: ImageRef,
        model_name: str,
        version: str,
        prepared: _Prepared,
        log: LogSink,
        *,
        previous: _Previous | None = None,
    ) -> JobOutcome | None:
        if previous is None:
            job = self._history.latest_image(
                model_name, repository=target.repository, exclude_version=version
            )
            if job is None or job.digest is None:
                return None
            previous = _Previous(f"version {job.version}'s layers", job.digest)
        tag = version_tag(version)
        self._step("assemble")
        with self._registry_factory(target.host) as registry:
            try:
                staged = assembly.prepare(
                    registry,
                    target.path,
                    previous_reference=previous.digest,
                    model_dir=prepared.package.path,
                    labels=prepared.labels,
                    require_labels={RUNTIME_KEY_LABEL: prepared.key},
                    target=MODEL_DIR,
                )
            except NotAssemblable as exc:
                log(f"registry assembly not possible ({exc}); building with the engine")
                return None
        log(
            f"assembled {target.repository}@{staged.digest} in the registry on top of "
            f"{previous.label}"
        )
        note = None
        if self._smoke is not None and self._native is not None and not self._engine_reachable():
            note = "published untested: no Docker Engine or Podman for the smoke test"
            log(note)
        elif self._smoke is not None and self._warm is not None:
            # Only the model layer differs from the previous version's image, which passed its
            # smoke test: load the new artifacts in a warm container of that image (warm.py).
            self._step("smoke")
            tested = previous.digest
            self._warm.check(
                prepared.key,
                str(target.with_digest(tested)),
                prepared.package.path,
                prepared.example,
                log,
                pull=lambda: self._pull(target.repository, tested),
            )
        elif self._smoke is not None:
            # Stored untagged: nothing is published until the smoke test passes.
            self._step("smoke")
            self._pull(target.repository, staged.digest)
            self._smoke.check(str(target.with_digest(staged.digest)), prepared.example, log)
        self._step("push")
        with self._registry_factory(target.host) as registry:
            image = assembly.publish(registry, staged, tag)
        reference = str(target.with_tag(tag))
        note = image.note or note
        return JobOutcome(image=reference, digest=image.digest, tags=(reference,), note=note)

    def _pull(self, repository: str, reference: str | None) -> None:
        assert reference is not None
        with_fresh_credentials(
            self._credentials,
            lambda c: self._engine.pull(
                repository, reference, username=c.username, password=c.password
            ),
        )

    # -- native path: no engine ---------------------------------------------------------------

    def _build_native(
        self, target: ImageRef, version: str, prepared: _Prepared, work: Path, log: LogSink
    ) -> JobOutcome | None:
        """Assemble from wheels in the registry; None: build with the engine instead."""
        assert self._native is not None
        self._step("build")
        base = base_reference(prepared.spec.base_image)
        tag = version_tag(version)
        note = None
        with self._registry_factory(target.host) as registry:
            base_registry = (
                registry if base.host == target.host else self._base_registry_factory(base.host)
            )
            try:
                result = self._native.build(
                    registry,
                    target.path,
                    base_registry=base_registry,
                    base_image=str(base),
                    model_dir=prepared.package.path,
                    python_version=prepared.package.python_version,
                    requirements=prepared.spec.requirements,
                    labels={**prepared.labels, RUNTIME_KEY_LABEL: prepared.key},
                    work=work / "native",
                    log=log,
                    derive_base=lambda base, packages: self._derived_base(
                        registry, base, packages, work / "os-packages", log
                    ),
                    expected_os_packages=prepared.spec.system_packages,
                )
            except NativeNotApplicable as exc:
                if self._config.engine_fallback and self._engine_reachable():
                    log(f"native build not possible ({exc}); building with the engine")
                    return None
                raise PermanentError(
                    f"{exc}: use a base image that has it (MLFLOW_DOCK_BASE_IMAGE) or give "
                    "mlflow-dock a Docker Engine or Podman (DOCKER_HOST) to build it"
                ) from exc
            finally:
                if base_registry is not registry:
                    base_registry.close()
            if self._smoke is not None:
                self._step("smoke")
                if self._engine_reachable():
                    self._pull(target.repository, result.digest)
                    self._smoke.check(str(target.with_digest(result.digest)), prepared.example, log)
                    if self._warm is not None:
                        self._warm.prewarm(prepared.key, str(target.with_digest(result.digest)))
                else:
                    note = "published untested: no Docker Engine or Podman for the smoke test"
                    log(note)
            self._step("push")
            published = assembly.publish_manifest(registry, target.path, tag, result.manifest)
        reference = str(target.with_tag(tag))
        note = published.note or note
        return JobOutcome(image=reference, digest=published.digest, tags=(reference,), note=note)

    def _derived_base(
        self,
        registry: RegistryClient,
        base: BaseImage,
        packages: tuple[str, ...],
        context: Path,
        log: LogSink,
    ) -> Callable[[], str] | None:
        """``base`` + Debian ``packages`` in the target registry ("path@digest"), see ospackages.

        Found by its content-addressed tag if any build made it before (no engine needed
        then); otherwise built by the engine in the background (the native builder packs and
        uploads wheels meanwhile) and pushed once. Returns a call that waits for it, or None
        when no engine may build it.
        """
        derived = self._config.repository_for(ospackages.DERIVED_REPOSITORY)
        tag = ospackages.derived_tag(base.manifest.digest, packages)
        digest = registry.manifest_digest(derived.path, tag)
        if digest is not None:
            log(f"reusing derived base {derived.repository}:{tag} ({' '.join(packages)})")
            return lambda: f"{derived.path}@{digest}"
        if not self._config.engine_fallback or not self._engine_reachable():
            return None
        executor = ThreadPoolExecutor(1, thread_name_prefix="derived-base")
        future = executor.submit(
            self._build_derived_base, registry, base, packages, derived, tag, context, log
        )
        executor.shutdown(wait=False)
        return future.result

    def _build_derived_base(
        self,
        registry: RegistryClient,
        base: BaseImage,
        packages: tuple[str, ...],
        derived: ImageRef,
        tag: str,
        context: Path,
        log: LogSink,
    ) -> str:
        shared = self._runtime_locks_shared
        # One worker builds it; the others wait and then find it.
        with shared.hold(f"os-base:{tag}") if shared else nullcontext():
            digest = registry.manifest_digest(derived.path, tag)
            if digest is not None:
                return f"{derived.path}@{digest}"
            self._ensure_repository(derived)
            source = f"{base.host}/{base.repository}"
            if base.host == registry.host:
                # With the target's credentials, refreshed once if a cloud token was refused.
                self._pull(source, base.manifest.digest)
            else:
                self._engine.pull(source, base.manifest.digest, username="", password="")
            context.mkdir(parents=True, exist_ok=True)
            (context / "Dockerfile").write_text(
                ospackages.render_derived_dockerfile(f"{source}@{base.manifest.digest}", packages)
            )
            self._engine.build(
                context,
                extra_files={},
                tag=str(derived.with_tag(tag)),
                labels={
                    "io.mlflow-dock.derived-from": f"{source}@{base.manifest.digest}",
                    "io.mlflow-dock.os-packages": " ".join(packages),
                },
                log=log,
                timeout=self._config.build_timeout_seconds,
            )
            pushed = with_fresh_credentials(
                self._credentials,
                lambda c: self._engine.push(
                    derived.repository, tag, username=c.username, password=c.password, log=log
                ),
            )
        log(f"pushed derived base {derived.repository}:{tag}@{pushed.digest}")
        return f"{derived.path}@{pushed.digest}"

    def _engine_reachable(self) -> bool:
        try:
            self._engine.ping()
        except Exception:  # whatever the failure, there is no engine to use here
            return False
        return True

    # -- engine path --------------------------------------------------------------------------

    def _build_with_engine(
        self, target: ImageRef, version: str, prepared: _Prepared, work: Path, log: LogSink
    ) -> JobOutcome:
        self._step("build")
        runtime = self._ensure_runtime(prepared, work / "runtime", log)
        context = work / "image"
        context.mkdir(parents=True)
        (context / "Dockerfile").write_text(render_model_dockerfile(runtime, prepared.labels))
        shutil.move(str(prepared.package.path), str(context / "model"))
        tag = version_tag(version)
        local_ref = str(target.with_tag(tag))
        self._engine.build(
            context,
            extra_files={},
            tag=local_ref,
            labels={},
            log=log,
            timeout=self._config.build_timeout_seconds,
        )
        if self._smoke is not None:
            self._step("smoke")
            example = context / "model" / "serving_input_example.json"
            self._smoke.check(local_ref, example if prepared.example else None, log)
            if self._warm is not None:
                # The next version of this runtime will be checked warm; get it warm now.
                self._warm.prewarm(prepared.key, local_ref)
        self._step("push")
        pushed = self._push(target, tag, log)
        log(f"pushed {pushed.reference}@{pushed.digest}")
        return JobOutcome(
            image=pushed.reference,
            digest=pushed.digest,
            tags=(pushed.reference,),
            note=pushed.note,
        )

    def _build_stock(
        self, target: ImageRef, version: str, prepared: _Prepared, work: Path, log: LogSink
    ) -> JobOutcome:
        """MLFLOW_DOCK_BUILDER=mlflow: MLflow's own Dockerfile (see stock.py), then as above."""
        context = work / "stock"
        self._step("build")
        log("building with MLflow's stock Dockerfile (MLFLOW_DOCK_BUILDER=mlflow)")
        extra_files = stock.render_stock_context(
            prepared.package.path,
            context,
            base_image=self._config.base_image,
            python_version=prepared.package.python_version,
            pip=prepared.spec.pip,
            ca_bundle=prepared.extra_files.get("_build/ca-bundle.crt"),
        )
        tag = version_tag(version)
        local_ref = str(target.with_tag(tag))
        self._engine.build(
            context,
            extra_files=extra_files,
            tag=local_ref,
            labels=prepared.labels,
            log=log,
            timeout=self._config.build_timeout_seconds,
        )
        if self._smoke is not None:
            self._step("smoke")
            self._smoke.check(local_ref, prepared.example, log)
        self._step("push")
        pushed = self._push(target, tag, log)
        return JobOutcome(
            image=pushed.reference,
            digest=pushed.digest,
            tags=(pushed.reference,),
            note=pushed.note,
        )

    def _already_published(self, target: ImageRef, version: str, log: LogSink) -> JobOutcome | None:
        """The version's image if its tag exists: a re-run never moves a version tag.

        A job re-run after a lost lease (its first run may have pushed and then lost the store)
        adopts what is there instead of publishing a second, different digest.
        """
        tag = version_tag(version)
        with self._registry_factory(target.host) as registry:
            digest = registry.manifest_digest(target.path, tag)
        if digest is None:
            return None
        reference = str(target.with_tag(tag))
        log(f"{reference} is already published ({digest}); adopting it")
        return JobOutcome(image=reference, digest=digest, tags=(reference,))

    def _push(self, target: ImageRef, tag: str, log: LogSink) -> PushResult:
        """Push the local image under `tag`, unless the tag names an image already.

        Checked right before the push (the build may have taken minutes): a version tag never
        moves (assembly.publish_manifest has the same rule for registry-side publishing).
        """
        with self._registry_factory(target.host) as registry:
            current = registry.manifest_digest(target.path, tag)
        if current is not None:
            note = f"tag {tag} already pointed at {current}; kept it (version tags never move)"
            log(note)
            return PushResult(str(target.with_tag(tag)), current, note=note)
        return with_fresh_credentials(
            self._credentials,
            lambda c: self._engine.push(
                target.repository, tag, username=c.username, password=c.password, log=log
            ),
        )

    def _ensure_runtime(self, prepared: _Prepared, context: Path, log: LogSink) -> str:
        """The local runtime image for the spec, built only if this engine does not have it."""
        reference = f"{RUNTIME_REPOSITORY}:{prepared.key[:40]}"
        # Called under _runtime_lock: one build of this runtime at a time, deployment-wide.
        if self._engine.image_exists(reference):
            log(f"reusing runtime image {reference}")
            return reference
        log(f"building runtime image {reference} (new requirements or first build here)")
        context.mkdir(parents=True)
        (context / "Dockerfile").write_text(render_runtime_dockerfile(prepared.spec))
        (context / "requirements.txt").write_text(prepared.spec.requirements)
        self._engine.build(
            context,
            extra_files=prepared.extra_files,
            tag=reference,
            labels={RUNTIME_KEY_LABEL: prepared.key},
            log=log,
            timeout=self._config.build_timeout_seconds,
        )
        return reference

    # -- aliases ------------------------------------------------------------------------------

    def _alias(self, job: Job, log: LogSink) -> JobOutcome:
        assert job.alias is not None
        self._step("tag")
        build = self._history.build_for(job.model_name, job.version)
        if build is None or build.state is not JobState.SUCCEEDED or not build.digest:
            reason = build.error if build is not None and build.error else "no image was built"
            raise PermanentError(
                f"version {job.version} of '{job.model_name}' has no image: {reason}"
            )
        target = self._config.repository_for(job.model_name)
        tag = alias_tag(job.alias)
        with self._registry_factory(target.host) as registry:
            digest = registry.tag(target.path, build.digest, tag)
        reference = str(target.with_tag(tag))
        log(f"tagged {reference} -> {digest}")
        return JobOutcome(image=reference, digest=digest, tags=(reference,))

    def _unalias(self, job: Job, log: LogSink) -> JobOutcome:
        assert job.alias is not None
        self._step("untag")
        target = self._config.repository_for(job.model_name)
        tag = alias_tag(job.alias)
        reference = str(target.with_tag(tag))
        with self._registry_factory(target.host) as registry:
            digest = registry.manifest_digest(target.path, tag)
            if digest is None:
                log(f"{reference} does not exist; nothing to remove")
                return JobOutcome(image=reference, digest="", note="tag did not exist")
            # ECR deletes one tag with its own API (BatchDeleteImage by tag); elsewhere the
            # OCI 1.1 tag deletion, which registries without it refuse.
            deleted = (
                self._ecr.delete_tag(target.path, tag)
                if self._ecr is not None
                else registry.delete_tag(target.path, tag)
            )
            if deleted:
                log(f"removed tag {reference} (was {digest})")
                return JobOutcome(image=reference, digest=digest)
        # Deleting by digest instead would remove the image for every other tag using it.
        note = (
            f"registry {target.host} cannot delete a tag without deleting its manifest, "
            f"which other tags may use; {reference} was left in place"
        )
        log(note)
        return JobOutcome(image=reference, digest=digest, note=note)
