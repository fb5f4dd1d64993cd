"""The engine-free builder: a model version's image assembled from wheels in the registry.

As ko and Jib do, nothing is built in a container: the base image's manifest and config are
read from the registry, the model's requirements are installed on the worker by uv for the
*target* platform (:mod:`~mlflow_dock.imaging.wheels`), what was installed is packed as
deterministic layers, one per installed distribution (:mod:`~mlflow_dock.imaging.layers`), and
the image is written to the registry as blobs, a config and a manifest. No Docker Engine, no
root, no emulation for other architectures.

Image layout (the same paths as the engine-built runtime, see imaging/dockerfile.py):

    base image layers (mounted from the base repository when on the same registry)
    virtualenv layer:   /opt/mlflow-dock/venv/{pyvenv.cfg, bin/python -> base Python},
                        /home/mlflow owned by 10001
    serving layer:      /opt/mlflow-dock/serving (the model server, mlflow_dock.serving: the
                        same blob in every image, shared like the virtualenv layer)
    one layer per installed distribution, in site-packages (+ its console scripts in bin/)
    model layers:       each model file of at least a threshold (the weights) a layer of its
                        own, then the rest of /opt/ml/model (history "COPY model/ /opt/ml/model/"),
                        see imaging/modellayers.py; the registry fast path of imaging/assembly.py
                        replaces them all for the next version
    config:             the server's command, the version's V2 name and version in its Env

Whatever cannot be built this way raises :class:`NativeNotApplicable` before anything is
written: a requirement without a wheel for the target, an extension needing a shared library
that neither the base image nor the wheels have, a base image without glibc or the model's
Python. The fallback order (app.py) then tries the engine, or the job fails with one line naming
both ways out. One exception: missing libraries that known Debian packages provide are added to
a derived base (ospackages.py, made by :class:`DerivedBases`) while the wheels are uploaded;
should that fail, the refusal comes after some package blobs were written (content-addressed,
so they are simply there for the next image).

:class:`NativeBuilder` is the ``Builder`` strategy (imaging/builder.py); engine-free, it never
imports the engine client (an import contract checks it): the engine's one job here, the
derived base, comes in through the :class:`DerivedBases` protocol.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Protocol, cast

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging import layers as layerlib
from mlflow_dock.imaging import ospackages, wheels
from mlflow_dock.imaging.baseimage import BaseImage, NotNativeBase, resolve_base
from mlflow_dock.imaging.builder import BuildRequest, NotApplicable, StagedImage
from mlflow_dock.imaging.dockerfile import (
    HEALTHCHECK_COMMAND,
    MODEL_DIR,
    RUNTIME_UID,
    SERVE_COMMAND,
    SERVING_PORT,
    VENV_DIR,
)
from mlflow_dock.imaging.elf import read_elf
from mlflow_dock.imaging.layercache import CachedLayer, LayerCache, NoLayerCache
from mlflow_dock.imaging.modellayers import ModelLayerPolicy, push_model_layers
from mlflow_dock.imaging.registrycache import NoSharedLayers, SharedLayers, base_name
from mlflow_dock.imaging.wheels import Distribution, NoWheel, Platform
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.oci.manifest import (
    DOCKER_LAYER,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Manifest,
)
from mlflow_dock.oci.mutate import ModelLayer
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.oci.remote import RegistryClient, RegistryError, RegistryPermanentError
from mlflow_dock.serving import layer as serving_layer
from mlflow_dock.supply import sbom
from mlflow_dock.supply.sbom import KnownContents

__all__ = [
    "DeriveBase",
    "DerivedBases",
    "MissingLibrary",
    "NativeBuilder",
    "NativeConfig",
    "NativeInputs",
    "NativeNotApplicable",
    "NativeResult",
    "NoDerivedBases",
    "base_reference",
    "native_runtime_key",
]

HOME_DIR: Final = "/home/mlflow"
CREATED_BY: Final = "mlflow-dock native"
# Loaded by the dynamic loader itself or always part of glibc's ABI: never in a wheel.
_ALWAYS_PRESENT: Final = frozenset({"linux-vdso.so.1"})


# What the user can do when nothing else can build the version either.
ENGINE_HINT: Final = (
    "use a base image that has it (MLFLOW_DOCK_BASE_IMAGE) or give mlflow-dock a Docker Engine "
    "or Podman (DOCKER_HOST) to build it"
)


class NativeNotApplicable(NotApplicable):
    """This model cannot be built without an engine; ``package`` names the culprit if known."""

    def __init__(self, message: str, *, package: str | None = None) -> None:
        super().__init__(message, hint=ENGINE_HINT)
        self.package = package


class MissingLibrary(NativeNotApplicable):
    """An extension module needs a shared library that neither the base nor its wheel has.

    ``libraries``: every soname missing anywhere in the install, not only the named package's.
    """

    def __init__(self, message: str, *, package: str | None, libraries: tuple[str, ...]) -> None:
        super().__init__(message, package=package)
        self.libraries = libraries


# Given the base and the Debian packages it lacks: None when the base with those packages
# (ospackages.py) can be neither found nor built (no engine), else a call that waits for it
# (built in the background meanwhile) and returns its reference in the target registry,
# "repository@digest".
DeriveBase = Callable[[BaseImage, tuple[str, ...]], Callable[[], str] | None]


class DerivedBases(Protocol):
    """Bases with Debian packages added (imaging/derived.py), in the target registry."""

    def derive(
        self,
        registry: RegistryClient,
        base: BaseImage,
        packages: tuple[str, ...],
        *,
        work: Path,
        log: LogSink,
    ) -> Callable[[], str] | None:
        """A call that waits for ``base`` + ``packages`` ("path@digest"), or None if impossible."""
        ...


class NoDerivedBases:
    """Without an engine to add OS packages: a base that lacks a library cannot be fixed."""

    def derive(
        self,
        registry: RegistryClient,
        base: BaseImage,
        packages: tuple[str, ...],
        *,
        work: Path,
        log: LogSink,
    ) -> Callable[[], str] | None:
        return None


@dataclass(frozen=True, kw_only=True)
class NativeInputs:
    """What one native image is made of, besides the registry it is written to."""

    base_image: str
    model_dir: Path
    python_version: str
    requirements: str
    labels: dict[str, str]
    work: Path
    log: LogSink
    # What the requirements are known to need (lightgbm -> libgomp1), see ospackages.py.
    expected_os_packages: tuple[str, ...] = ()
    # The model server's layer (path -> content) and the version's environment (its V2 name
    # and version), see mlflow_dock.serving.layer.
    serving_files: Mapping[str, bytes] = field(
        default_factory=serving_layer.layer_files, repr=False
    )
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class NativeConfig:
    platforms: tuple[Platform, ...]
    cache_dir: Path  # uv's cache and the base-image facts; one filesystem with the work dir
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    ca_bundle: bytes | None = None
    timeout_seconds: float = 1800
    # Threads for registry requests (many layer lookups and mounts in flight at once) ...
    workers: int = 16
    # ... while at most this many layers are hashed or packed at once (CPU bound), per process.
    pack_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    codec: layerlib.LayerCodec = layerlib.DEFAULT_CODEC
    model_layers: ModelLayerPolicy = field(default_factory=ModelLayerPolicy)


@dataclass
class Counts:
    """What happened to each blob; updated from the builder's worker threads."""

    uploaded: int = 0
    mounted: int = 0
    present: int = 0
    tarred: int = 0
    cached: int = 0  # layers found in the registry's layer cache (then mounted)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def __str__(self) -> str:
        return (
            f"{self.uploaded} blob(s) uploaded, {self.mounted} mounted, "
            f"{self.present} already there; {self.tarred} layer(s) packed, "
            f"{self.cached} found in the registry's layer cache"
        )


@dataclass(frozen=True)
class _Plan:
    """One platform, checked: what its image is made of."""

    platform: Platform
    base: BaseImage
    python: str
    site: Path
    dists: Sequence[Distribution]
    # The derived base with missing OS packages, when one is on its way (waits for it).
    derived: Callable[[], BaseImage] | None = None


@dataclass(frozen=True)
class NativeResult:
    repository: str
    manifest: Manifest = field(repr=False)
    platform_digests: dict[str, str]
    counts: Counts
    packages: int
    # What it holds as the builder knows it: the SBOM needs no layer read back.
    contents: KnownContents | None = field(default=None, repr=False)
    # Its model files with a layer of their own: path in the model -> layer digest.
    model_files: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def tag(self, registry: RegistryClient, tag: str) -> str:
        return registry.put_manifest(self.repository, tag, self.manifest)


def native_runtime_key(engine_key: str, platforms: tuple[Platform, ...]) -> str:
    """The runtime key of a natively built image: same inputs, other layout than the engine's."""
    text = f"native/{layerlib.LAYOUT_VERSION}/{engine_key}/" + ",".join(map(str, platforms))
    return hashlib.sha256(text.encode()).hexdigest()


def base_reference(base_image: str) -> ImageRef:
    """MLFLOW_DOCK_BASE_IMAGE as a registry reference; Docker Hub names get their host."""
    first, slash, _ = base_image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        base_image = "docker.io/" + (base_image if slash else f"library/{base_image}")
    try:
        ref = ImageRef.parse(base_image)
    except ValueError as exc:
        raise NotNativeBase(
            f"MLFLOW_DOCK_BASE_IMAGE={base_image!r} is not a registry reference: {exc}"
        ) from exc
    if ref.tag is None and ref.digest is None:
        ref = ref.with_tag("latest")
    return ref


# --------------------------------------------------------------------------- checks


def check_libraries(
    site: Path, dists: Sequence[Distribution], base: BaseImage, platform: Platform
) -> None:
    """Every ELF in the install is for ``platform`` and finds its DT_NEEDED libraries."""
    owner: dict[str, str] = {}
    for dist in dists:
        for relative in dist.files:
            owner[relative] = dist.name
    shipped: set[str] = set()
    elves: list[tuple[str, tuple[str, ...], str]] = []
    for root, _dirs, files in os.walk(site):
        for name in files:
            shipped.add(name)
            if ".so" not in name:
                continue
            path = Path(root) / name
            info = read_elf(path)
            if info is None:
                continue
            relative = path.relative_to(site).as_posix()
            if info.soname:
                shipped.add(info.soname)
            if info.machine != platform.machine:
                raise NativeNotApplicable(
                    f"package '{owner.get(relative, relative)}' installed a {info.machine} "
                    f"binary ({relative}) for {platform}",
                    package=owner.get(relative),
                )
            elves.append((relative, info.needed, owner.get(relative, relative)))
    available = base.facts.libraries | shipped | _ALWAYS_PRESENT
    first: tuple[str, list[str], str] | None = None
    every: set[str] = set()
    for relative, needed, package in sorted(elves):
        missing = [lib for lib in needed if lib not in available]
        if missing:
            first = first or (relative, missing, package)
            every.update(missing)
    if first is not None:
        relative, missing, package = first
        raise MissingLibrary(
            f"package '{package}' needs {', '.join(missing)} ({relative}), which base image "
            f"{base.host}/{base.repository} does not have",
            package=package,
            libraries=tuple(sorted(every)),
        )


# --------------------------------------------------------------------------- builder


RegistryFactory = Callable[[str], RegistryClient]


def _anonymous_registry(host: str) -> RegistryClient:
    return RegistryClient(host, timeout=BASE_REGISTRY_TIMEOUT)


# A base image on another registry than the target (the default python:X.Y-slim on Docker Hub)
# is read anonymously (the target's credentials are not that registry's business) and with a
# short timeout: a machine that cannot reach it goes to the engine fallback in seconds.
BASE_REGISTRY_TIMEOUT: Final = 10.0


class NativeBuilder:
    """The engine-free ``Builder``: the image written to the target registry, untagged."""

    description = "native build"
    means = "the native builder"

    def __init__(
        self,
        config: NativeConfig,
        *,
        registry_factory: RegistryFactory,
        cache: LayerCache | None = None,
        shared: SharedLayers | None = None,
        base_registry_factory: RegistryFactory = _anonymous_registry,
        derived: DerivedBases | None = None,
    ) -> None:
        self._config = config
        self._cache: LayerCache = cache or NoLayerCache()
        self._shared: SharedLayers = shared or NoSharedLayers()
        self._codec = config.codec
        # Shared by every build of this process: files' hashes (uv's hard links keep their
        # inodes from one build to the next) and the cores that hash and pack.
        self._digests = layerlib.FileDigests()
        self._cores = threading.BoundedSemaphore(max(1, config.pack_workers))
        self._registry_factory = registry_factory
        self._base_registry_factory = base_registry_factory
        self._derived_bases = derived or NoDerivedBases()

    @property
    def platforms(self) -> tuple[Platform, ...]:
        return self._config.platforms

    def build(self, request: BuildRequest) -> StagedImage:
        request.step("build")
        try:
            base = base_reference(request.spec.base_image)
        except NotNativeBase as exc:
            raise NativeNotApplicable(str(exc)) from exc
        target, work, log = request.target, request.work, request.log
        with self._registry_factory(target.host) as registry:
            base_registry = (
                registry if base.host == target.host else self._base_registry_factory(base.host)
            )
            try:
                result = self.write_image(
                    registry,
                    target.path,
                    NativeInputs(
                        base_image=str(base),
                        model_dir=request.package.path,
                        python_version=request.package.python_version,
                        requirements=request.spec.requirements,
                        labels=request.runtime_labels,
                        work=work / "native",
                        log=log,
                        expected_os_packages=request.spec.system_packages,
                        serving_files=request.spec.serving_files,
                        env=request.env,
                    ),
                    base_registry=base_registry,
                    derive_base=lambda base, packages: self._derived_bases.derive(
                        registry, base, packages, work=work / "os-packages", log=log
                    ),
                )
            finally:
                if base_registry is not registry:
                    base_registry.close()
        return StagedImage(
            result.manifest, contents=result.contents, model_files=result.model_files
        )

    def write_image(
        self,
        registry: RegistryClient,
        repository: str,
        inputs: NativeInputs,
        *,
        base_registry: RegistryClient,
        derive_base: DeriveBase | None = None,
    ) -> NativeResult:
        """Write the image (an index for several platforms) to ``repository``, untagged.

        ``derive_base``: when the only obstacle is shared libraries that known Debian packages
        provide, get the base with those packages from it (one engine step, see ospackages.py)
        and build on that; only for a single platform (the engine builds for its own). The
        derived base is made while the wheels are packed and uploaded, and started before uv
        runs when ``inputs.expected_os_packages`` (what the requirements are known to need,
        e.g. libgomp1 for lightgbm) provide sonames the base lacks.
        """
        base_image, work, log = inputs.base_image, inputs.work, inputs.log
        python_version, requirements = inputs.python_version, inputs.requirements
        model_dir, labels = inputs.model_dir, inputs.labels
        expected_os_packages = inputs.expected_os_packages
        try:
            base_ref = base_reference(base_image)
        except NotNativeBase as exc:
            raise NativeNotApplicable(str(exc)) from exc
        work.mkdir(parents=True, exist_ok=True)
        counts = Counts()
        ca_path: Path | None = None
        if self._config.ca_bundle is not None:
            ca_path = work / "ca-bundle.crt"
            ca_path.write_bytes(self._config.ca_bundle)
        started = time.monotonic()
        # Everything that can refuse the native build runs before the first blob is written.
        plans = []
        derivable = derive_base is not None and len(self._config.platforms) == 1
        unused: list[Callable[[], str]] = []  # derived bases started early, not (yet) needed
        try:
            for platform in self._config.platforms:
                plan = self._plan(
                    platform,
                    registry,
                    base_registry,
                    base_ref,
                    python_version=python_version,
                    requirements=requirements,
                    work=work,
                    ca_path=ca_path,
                    log=log,
                    started=started,
                    derive_base=derive_base if derivable else None,
                    expected_os_packages=expected_os_packages,
                    unused=unused,
                )
                plans.append(plan)
        finally:
            for waiter in unused:
                # Not needed after all (a wheel vendored the library) or the build was
                # refused: let it finish rather than leave an engine build running for a job
                # that has moved on (its work directory is about to be removed).
                with contextlib.suppress(Exception):  # nothing depends on it
                    waiter()

        # Layers under the model: the platform's base (+ the apt layer of a derived base), the
        # virtualenv, the model server and at most its budget of package layers; it bounds the
        # file layers.
        below = max(
            len(plan.base.layers)
            + (1 if plan.derived is not None else 0)
            + 2
            + min(
                len(plan.dists),
                layerlib.package_layer_budget(
                    len(plan.base.layers) + (1 if plan.derived is not None else 0)
                ),
            )
            for plan in plans
        )
        with ThreadPoolExecutor(self._config.workers, thread_name_prefix="native") as pool:
            model = pool.submit(
                push_model_layers,
                registry,
                repository,
                model_dir,
                policy=self._config.model_layers,
                layers_below=below,
                log=log,
                work=work,
                # "packed" counts the shared layers no cache had; the model's are packed always.
                on_layer=lambda outcome: None if outcome == "tarred" else counts.add(outcome),
            )
            manifests: list[tuple[Platform, Manifest]] = []
            for plan in plans:
                manifest = self._platform_image(
                    pool,
                    registry,
                    repository,
                    plan=plan,
                    base_registry=base_registry,
                    python_version=python_version,
                    model=model.result,
                    labels=labels,
                    work=work,
                    counts=counts,
                    serving_files=inputs.serving_files,
                    env=inputs.env,
                    log=log,
                )
                registry.put_manifest_by_digest(repository, manifest)
                manifests.append((plan.platform, manifest))
        if len(manifests) == 1:
            result_manifest = manifests[0][1]
        else:
            result_manifest = _index(manifests)
            registry.put_manifest_by_digest(repository, result_manifest)
        log(f"assembled {repository}@{result_manifest.digest} without an engine: {counts}")
        return NativeResult(
            repository=repository,
            manifest=result_manifest,
            platform_digests={str(p): m.digest for p, m in manifests},
            counts=counts,
            packages=max(len(plan.dists) for plan in plans),
            contents=_known_contents(plans, python_version, model.result()[-1].digest),
            model_files={
                layer.file: layer.digest for layer in model.result() if layer.file is not None
            },
        )

    def _plan(
        self,
        platform: Platform,
        registry: RegistryClient,
        base_registry: RegistryClient,
        base_ref: ImageRef,
        *,
        python_version: str,
        requirements: str,
        work: Path,
        ca_path: Path | None,
        log: LogSink,
        started: float,
        derive_base: DeriveBase | None,
        expected_os_packages: tuple[str, ...],
        unused: list[Callable[[], str]],
    ) -> _Plan:
        """One platform's base, install and checks: everything that can refuse the build.

        A derived base started before uv runs is in ``unused`` until the plan takes it.
        """
        try:
            base = resolve_base(
                base_registry,
                base_ref.path,
                base_ref.digest or base_ref.tag or "latest",
                platform,
                cache_dir=self._config.cache_dir / "base-images",
            )
            python = base.python_for(python_version)
        except NotNativeBase as exc:
            raise NativeNotApplicable(str(exc)) from exc
        except RegistryError as exc:
            # The base is not in (or not readable from) that registry; an engine may
            # still have it locally or pull it with its own credentials. A registry other
            # than the target that cannot be reached at all counts too (the default base
            # on Docker Hub from a machine without Internet access); the target's own
            # outage stays retryable, since nothing could be pushed anyway.
            refused = isinstance(exc, RegistryPermanentError) and exc.status_code in (
                401,
                403,
                404,
            )
            if not refused and base_registry is registry:
                raise
            raise NativeNotApplicable(
                f"base image {base_ref} is not readable from its registry: {exc}"
            ) from exc
        early: tuple[tuple[str, ...], Callable[[], str]] | None = None
        derived: Callable[[], BaseImage] | None = None
        hint = ospackages.lacking(expected_os_packages, base.facts.libraries)
        if derive_base is not None and hint:
            # Known to be needed (lightgbm -> libgomp1) and the base lacks it: the engine's
            # apt step runs while uv installs.
            started_waiter = derive_base(base, hint)
            if started_waiter is not None:
                early = (hint, started_waiter)
                unused.append(started_waiter)
        site = work / f"site-{platform.architecture}"
        try:
            dists = wheels.install(
                requirements,
                site,
                platform=platform,
                python_version=python_version,
                glibc=base.facts.glibc,
                cache_dir=self._config.cache_dir / "uv",
                index_url=self._config.index_url,
                extra_index_urls=self._config.extra_index_urls,
                ca_bundle=ca_path,
                timeout=self._config.timeout_seconds,
            )
        except NoWheel as exc:
            raise NativeNotApplicable(str(exc), package=exc.package) from exc
        try:
            check_libraries(site, dists, base, platform)
        except MissingLibrary as exc:
            packages = ospackages.packages_for(exc.libraries)
            if derive_base is None or packages is None:
                raise
            if early is not None and set(packages) <= set(early[0]):
                waiter: Callable[[], str] | None = early[1]
                unused.remove(early[1])
            else:
                waiter = derive_base(base, packages)
            if waiter is None:
                raise
            log(
                f"base image lacks {', '.join(exc.libraries)}: adding Debian package(s) "
                f"{' '.join(packages)} to it (engine, once per base and package set)"
            )
            derived = self._derived(registry, base, platform, waiter, site, dists)
        log(
            f"{platform}: {len(dists)} packages installed for "
            f"{platform.python_platform(base.facts.glibc)}, Python {python} "
            f"({time.monotonic() - started:.1f}s)"
        )
        return _Plan(platform, base, python, site, dists, derived)

    def _derived(
        self,
        registry: RegistryClient,
        parent: BaseImage,
        platform: Platform,
        waiter: Callable[[], str],
        site: Path,
        dists: Sequence[Distribution],
    ) -> Callable[[], BaseImage]:
        """The derived base, once made, resolved and checked to have what was missing."""

        def finish() -> BaseImage:
            try:
                reference = waiter()
            except NativeNotApplicable:
                raise
            except PermanentError as exc:
                # apt refused (a base without apt, a package its distribution lacks): the
                # whole engine build is the remaining way, as for an unknown library.
                raise NativeNotApplicable(f"adding OS packages to the base failed: {exc}") from exc
            path, _, digest = reference.partition("@")
            try:
                base = resolve_base(
                    registry,
                    path,
                    digest,
                    platform,
                    cache_dir=self._config.cache_dir / "base-images",
                    parent=parent,
                )
            except NotNativeBase as exc:
                raise NativeNotApplicable(str(exc)) from exc
            check_libraries(site, dists, base, platform)
            return base

        return finish

    # -- layers ---------------------------------------------------------------------------

    def _ensure_blob(
        self,
        registry: RegistryClient,
        repository: str,
        digest: str,
        data: Path | bytes,
        counts: Counts,
    ) -> None:
        if registry.blob_exists(repository, digest):
            counts.add("present")
            return
        registry.upload_blob(repository, data, digest)
        counts.add("uploaded")

    def _shared_layer(
        self,
        registry: RegistryClient,
        repository: str,
        entries: Sequence[layerlib.Entry],
        *,
        label: str,
        work: Path,
        counts: Counts,
        log: LogSink,
    ) -> layerlib.LayerDigests:
        """A layer every image may share (a package, the virtualenv): reused by content.

        Its content key is looked up in this deployment's own cache, then in the registry's
        (any worker's pushes); a layer found is mounted into ``repository``. Only a layer no
        one ever pushed is packed, uploaded, and then published to both caches.
        """
        with self._cores:
            key = layerlib.content_key(entries, codec=self._codec, digests=self._digests)
        reused = self._reuse(registry, repository, key, label=label, counts=counts, log=log)
        if reused is not None:
            return reused
        with tempfile.NamedTemporaryFile(dir=work, suffix=".tar", delete=False) as out:
            path = Path(out.name)
            # Written to a file while hashed, never held whole in memory.
            with self._cores:
                layer = layerlib.write_layer(entries, out, codec=self._codec)
        counts.add("tarred")
        try:
            self._ensure_blob(registry, repository, layer.digest, path, counts)
            pushed = CachedLayer(layer.digest, layer.diff_id, layer.size, repository)
            self._cache.put(registry.host, key, pushed, label=label)
            self._shared.publish(
                registry, key, self._codec, pushed, label=label, data=path, log=log
            )
        finally:
            path.unlink(missing_ok=True)
        return layer

    def _reuse(
        self,
        registry: RegistryClient,
        repository: str,
        key: str,
        *,
        label: str,
        counts: Counts,
        log: LogSink,
    ) -> layerlib.LayerDigests | None:
        """Bring the layer with content ``key`` into ``repository`` if a cache knows its blob."""
        host = registry.host
        known = self._cache.get(host, key)
        if known is not None and self._place(registry, repository, known, counts):
            return layerlib.LayerDigests(known.digest, known.diff_id, known.size)
        found = self._shared.find(registry, key, self._codec, log)
        if found is None or not self._place(registry, repository, found, counts):
            return None
        counts.add("cached")
        # Remembered where it was found: the cache repository outlives model repositories.
        self._cache.put(host, key, found, label=label)
        return layerlib.LayerDigests(found.digest, found.diff_id, found.size)

    def _place(
        self, registry: RegistryClient, repository: str, cached: CachedLayer, counts: Counts
    ) -> bool:
        """Mount ``cached`` into ``repository`` (or find it there); False if neither works."""
        if cached.repository != repository and registry.mount_blob(
            repository, cached.digest, cached.repository
        ):
            counts.add("mounted")
            return True
        if registry.blob_exists(repository, cached.digest):
            counts.add("present")
            return True
        return False

    def _base_layers(
        self,
        pool: ThreadPoolExecutor,
        registry: RegistryClient,
        repository: str,
        base: BaseImage,
        base_registry: RegistryClient,
        counts: Counts,
        log: LogSink,
    ) -> Callable[[], None]:
        """Start bringing the base's layers into ``repository``; returns a call that waits.

        From the base's own repository on the same registry; a base on another registry is
        copied through this worker once and kept in the registry's layer cache, from where
        every later image mounts it.
        """
        name = base_name(base.manifest.digest)
        foreign = base.host != registry.host
        kept = foreign and self._shared.kept(registry, name)
        jobs: list[Future[bool]] = [
            pool.submit(
                self._base_layer,
                registry,
                repository,
                base,
                base_registry,
                layer,
                counts,
                kept=kept,
            )
            for layer in base.layers
        ]

        def wait() -> None:
            copied = [job.result() for job in jobs]
            if foreign and any(copied):
                self._shared.keep(registry, name, base.layers, repository=repository, log=log)

        return wait

    def _base_layer(
        self,
        registry: RegistryClient,
        repository: str,
        base: BaseImage,
        base_registry: RegistryClient,
        layer: dict[str, Any],
        counts: Counts,
        *,
        kept: bool,
    ) -> bool:
        """True if the blob was copied from another registry (then worth keeping)."""
        digest, size = str(layer["digest"]), int(layer["size"])
        if base.host == registry.host:
            mounted = registry.mount_blob(repository, digest, base.repository)
        else:
            mounted = kept and self._shared.mount(registry, repository, digest)
        if mounted:
            counts.add("mounted")
            return False
        if registry.blob_exists(repository, digest):
            counts.add("present")
            return False
        # Another registry (or one that does not mount): copy the blob through this worker,
        # streamed (ranged reads, so an interrupted chunked upload resumes), never in memory.
        with base_registry.open_blob(base.repository, digest, size) as blob:
            registry.upload_blob(repository, cast(IO[bytes], blob), digest)
        counts.add("uploaded")
        return base.host != registry.host

    def _platform_image(
        self,
        pool: ThreadPoolExecutor,
        registry: RegistryClient,
        repository: str,
        *,
        plan: _Plan,
        base_registry: RegistryClient,
        python_version: str,
        model: Callable[[], list[ModelLayer]],
        labels: dict[str, str],
        work: Path,
        counts: Counts,
        serving_files: Mapping[str, bytes],
        env: Mapping[str, str],
        log: LogSink,
    ) -> Manifest:
        base, python, site, dists = plan.base, plan.python, plan.site, plan.dists
        major_minor = ".".join(python_version.split(".")[:2])
        layout = layerlib.VenvLayout(VENV_DIR, major_minor)
        sizes = {d.dist_info: layerlib.installed_size(d, site) for d in dists}
        # A derived base has one layer more than its parent (the apt step).
        base_layers = len(base.layers) + (1 if plan.derived is not None else 0)
        groups = layerlib.group_distributions(
            dists, sizes, max_layers=layerlib.package_layer_budget(base_layers)
        )

        def package(group: layerlib.PackageGroup) -> layerlib.LayerDigests:
            entries = group.entries(site, layout)
            return self._shared_layer(
                registry, repository, entries, label=group.label, work=work, counts=counts, log=log
            )

        # The largest first: should they need packing, they are the longest jobs.
        by_size = sorted(
            groups, key=lambda g: -sum(sizes.get(d.dist_info, 0) for d in g.distributions)
        )
        started = {id(group): pool.submit(package, group) for group in by_size}
        package_jobs = [started[id(group)] for group in groups]
        if plan.derived is not None:
            # Packages are packed and uploaded meanwhile; they do not depend on the base.
            base, base_registry = plan.derived(), registry
        base_done = self._base_layers(pool, registry, repository, base, base_registry, counts, log)
        venv_job = pool.submit(
            self._shared_layer,
            registry,
            repository,
            _venv_entries(layout, python),
            label="virtualenv",
            work=work,
            counts=counts,
            log=log,
        )
        serving_job = pool.submit(
            self._shared_layer,
            registry,
            repository,
            _serving_entries(serving_files),
            label="model server",
            work=work,
            counts=counts,
            log=log,
        )
        base_done()
        venv = venv_job.result()
        serving = serving_job.result()
        package_layers = [job.result() for job in package_jobs]
        model_layers = model()

        created = _created()
        config = _config(
            base,
            labels=labels,
            created=created,
            history=[
                ("virtualenv " + VENV_DIR + f" (home {os.path.dirname(python)})", venv),
                (f"COPY serving/ {serving_layer.SERVING_DIR}/ # {CREATED_BY}", serving),
                *(
                    (f"uv pip install {group.label} # {CREATED_BY}", layer)
                    for group, layer in zip(groups, package_layers, strict=True)
                ),
                *(
                    (layer.created_by(MODEL_DIR, f"# {CREATED_BY}"), layer)
                    for layer in model_layers
                ),
            ],
            env=env,
        )
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        self._ensure_blob(registry, repository, config_digest, config, counts)
        descriptors = [
            {
                "mediaType": OCI_LAYER
                if layer.get("mediaType") == DOCKER_LAYER
                else layer.get("mediaType", OCI_LAYER),
                "digest": layer["digest"],
                "size": layer["size"],
            }
            for layer in base.layers
        ]
        for layer, media_type in (
            (venv, self._codec.media_type),
            (serving, self._codec.media_type),
            *((package, self._codec.media_type) for package in package_layers),
        ):
            descriptors.append(
                {"mediaType": media_type, "digest": layer.digest, "size": layer.size}
            )
        descriptors.extend(layer.descriptor() for layer in model_layers)
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": descriptors,
        }
        return Manifest.from_bytes(
            json.dumps(document, separators=(",", ":")).encode(), OCI_MANIFEST
        )


def _known_contents(plans: Sequence[_Plan], python_version: str, model_layer: str) -> KnownContents:
    """What the SBOM lists, from the install itself: its linux/amd64 image's (else the first).

    Each distribution is read as a layer scan reads it from the image (``supply/sbom.py``): the
    METADATA headers, direct_url.json and INSTALLER from the install directory, and the
    SHA-256 of RECORD as the package's layer holds it (rewritten for the virtualenv).
    """
    plan = next((p for p in plans if p.platform.architecture == "amd64"), plans[0])
    layout = layerlib.VenvLayout(VENV_DIR, ".".join(python_version.split(".")[:2]))
    site_dir = layout.site_packages.lstrip("/")
    found: dict[str, sbom.Distribution] = {}
    for dist in plan.dists:
        info = plan.site / dist.dist_info
        metadata = _text(info / "METADATA")
        if metadata is None:
            continue
        *_, record = layerlib.distribution_entries(dist, plan.site, layout)
        described = sbom.distribution_of(
            metadata,
            site_dir=site_dir,
            record_sha256=hashlib.sha256(record.data or b"").hexdigest(),
            direct_url=_text(info / "direct_url.json"),
            installer=_text(info / "INSTALLER"),
        )
        if described is not None:
            found.setdefault(described.key, described)
    base = plan.base
    return KnownContents(
        model_layer=model_layer,
        distributions=tuple(sorted(found.values(), key=lambda d: d.key)),
        base=sbom.BaseImage(
            f"{base.host}/{base.repository}",
            f"{base.host}/{base.repository}@{base.manifest.digest}",
        ),
    )


def _text(path: Path) -> str | None:
    try:
        return path.read_text("utf-8", errors="replace")
    except OSError:
        return None


def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch.isdigit() else datetime.now(UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _venv_entries(layout: layerlib.VenvLayout, python: str) -> list[layerlib.Entry]:
    """pyvenv.cfg with ``home`` at the base Python, bin/python links, and the user's home."""
    home = os.path.dirname(python)
    cfg = (
        f"home = {home}\n"
        "include-system-site-packages = false\n"
        f"version = {layout.python_version}\n"
        f"executable = {python}\n"
    ).encode()
    venv = layout.venv.lstrip("/")
    entries = [
        layerlib.Entry(f"{venv}/pyvenv.cfg", data=cfg),
        layerlib.Entry(f"{venv}/bin", kind=layerlib.DIR, mode=0o755),
        layerlib.Entry(f"{venv}/bin/python", kind=layerlib.SYMLINK, linkname=python),
        layerlib.Entry(f"{venv}/bin/python3", kind=layerlib.SYMLINK, linkname="python"),
        layerlib.Entry(
            f"{venv}/bin/python{layout.python_version}", kind=layerlib.SYMLINK, linkname="python"
        ),
        layerlib.Entry(layout.site_packages.lstrip("/"), kind=layerlib.DIR, mode=0o755),
        layerlib.Entry(
            HOME_DIR.lstrip("/"), kind=layerlib.DIR, mode=0o755, uid=RUNTIME_UID, gid=RUNTIME_UID
        ),
    ]
    return entries


def _serving_entries(files: Mapping[str, bytes]) -> list[layerlib.Entry]:
    """The model server's files (``serving.layer.layer_files()``) as one layer's entries.

    Depends on those files alone, so every image of every model gets the same blob.
    """
    return [layerlib.Entry(path, data=data) for path, data in sorted(files.items())]


def _env_list(base_env: list[str], updates: Mapping[str, str]) -> list[str]:
    env: dict[str, str] = {}
    for item in base_env:
        key, _, value = item.partition("=")
        env[key] = value
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(updates)
    env["PATH"] = f"{VENV_DIR}/bin:{path}"
    return [f"{key}={value}" for key, value in env.items()]


def _config(
    base: BaseImage,
    *,
    labels: dict[str, str],
    created: str,
    history: list[tuple[str, layerlib.LayerDigests | ModelLayer]],
    env: Mapping[str, str],
) -> bytes:
    image: dict[str, Any] = copy.deepcopy(base.config)
    for stale in ("container", "container_config", "docker_version", "id", "parent"):
        image.pop(stale, None)
    image["created"] = created
    image["os"] = base.platform.os
    image["architecture"] = base.platform.architecture
    if base.platform.variant:
        image["variant"] = base.platform.variant
    container = dict(image.get("config") or {})
    container["Env"] = _env_list(
        list(container.get("Env") or []),
        {
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
            "HOME": HOME_DIR,
            "__pyfunc_model_path__": MODEL_DIR,
            "MLFLOW_DOCK_SERVING_PORT": str(SERVING_PORT),
            **serving_layer.RUNTIME_ENV,
            # Last: registry assembly of the next version replaces these (oci/mutate.py).
            **env,
        },
    )
    container["User"] = f"{RUNTIME_UID}:{RUNTIME_UID}"
    container["Cmd"] = list(SERVE_COMMAND)
    container["Entrypoint"] = None
    container["ExposedPorts"] = {f"{SERVING_PORT}/tcp": {}}
    container["Healthcheck"] = {
        "Test": ["CMD", *HEALTHCHECK_COMMAND],
        "Interval": 30_000_000_000,
        "Timeout": 5_000_000_000,
        "StartPeriod": 60_000_000_000,
        "Retries": 3,
    }
    container["Labels"] = {**(container.get("Labels") or {}), **labels}
    image["config"] = container
    base_diff_ids = list((image.get("rootfs") or {}).get("diff_ids") or [])
    base_history = [h for h in image.get("history") or [] if isinstance(h, dict)]
    if sum(1 for h in base_history if not h.get("empty_layer")) != len(base_diff_ids):
        # History must describe every layer (registry assembly of the next version counts).
        base_history = [{"created_by": "base image layer"} for _ in base_diff_ids]
    image["rootfs"] = {
        "type": "layers",
        "diff_ids": base_diff_ids + [layer.diff_id for _, layer in history],
    }
    image["history"] = base_history + [
        {"created": created, "created_by": created_by, "comment": CREATED_BY}
        for created_by, _ in history
    ]
    return json.dumps(image, separators=(",", ":")).encode()


def _index(manifests: list[tuple[Platform, Manifest]]) -> Manifest:
    entries = []
    for platform, manifest in manifests:
        described: dict[str, str] = {"os": platform.os, "architecture": platform.architecture}
        if platform.variant:
            described["variant"] = platform.variant
        entries.append(
            {
                "mediaType": manifest.media_type,
                "digest": manifest.digest,
                "size": len(manifest.body),
                "platform": described,
            }
        )
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return Manifest.from_bytes(json.dumps(document, separators=(",", ":")).encode(), OCI_INDEX)
