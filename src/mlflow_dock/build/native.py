"""The engine-free builder: a model version's image assembled from wheels in the registry.

As ko and Jib do, nothing is built in a container: the base image's manifest and config are
read from the registry, the model's requirements are installed on the worker by uv for the
*target* platform (:mod:`~mlflow_dock.build.wheels`), what was installed is packed as
deterministic layers, one per installed distribution (:mod:`~mlflow_dock.build.layers`), and
the image is written to the registry as blobs, a config and a manifest. No Docker Engine, no
root, no emulation for other architectures.

Image layout (the same paths as the engine-built runtime, see build/dockerfile.py):

    base image layers (mounted from the base repository when on the same registry)
    virtualenv layer:   /opt/mlflow-dock/venv/{pyvenv.cfg, bin/python -> base Python},
                        /home/mlflow owned by 10001
    one layer per installed distribution, in site-packages (+ its console scripts in bin/)
    model layer:        /opt/ml/model (history "COPY model/ /opt/ml/model/", so the registry
                        fast path of build/assembly.py can replace it for the next version)

Whatever cannot be built this way raises :class:`NativeNotApplicable` before anything is
written: a requirement without a wheel for the target, an extension needing a shared library
that neither the base image nor the wheels have, a base image without glibc or the model's
Python. The runner then falls back to the engine, or fails with one line naming both ways out.
One exception: missing libraries that known Debian packages provide are added to a derived base
(ospackages.py) while the wheels are uploaded; should that fail, the refusal comes after some
package blobs were written (content-addressed, so they are simply there for the next image).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from mlflow_dock.build import layers as layerlib
from mlflow_dock.build import ospackages, wheels
from mlflow_dock.build.baseimage import BaseImage, NotNativeBase, resolve_base
from mlflow_dock.build.dockerfile import (
    HEALTHCHECK_COMMAND,
    MODEL_DIR,
    RUNTIME_UID,
    SERVE_COMMAND,
    SERVING_PORT,
    VENV_DIR,
)
from mlflow_dock.build.elf import read_elf
from mlflow_dock.build.layercache import CachedLayer, LayerCache
from mlflow_dock.build.wheels import Distribution, NoWheel, Platform
from mlflow_dock.errors import PermanentError
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.oci.manifest import (
    DOCKER_LAYER,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Manifest,
)
from mlflow_dock.oci.mutate import write_model_layer
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.oci.remote import RegistryClient, RegistryError, RegistryPermanentError

__all__ = [
    "DeriveBase",
    "MissingLibrary",
    "NativeBuilder",
    "NativeConfig",
    "NativeNotApplicable",
    "NativeResult",
    "base_reference",
    "native_runtime_key",
]

HOME_DIR: Final = "/home/mlflow"
CREATED_BY: Final = "mlflow-dock native"
# Loaded by the dynamic loader itself or always part of glibc's ABI: never in a wheel.
_ALWAYS_PRESENT: Final = frozenset({"linux-vdso.so.1"})


class NativeNotApplicable(PermanentError):
    """This model cannot be built without an engine; ``package`` names the culprit if known."""

    def __init__(self, message: str, *, package: str | None = None) -> None:
        super().__init__(message)
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


@dataclass(frozen=True, kw_only=True)
class NativeConfig:
    platforms: tuple[Platform, ...]
    cache_dir: Path  # uv's cache and the base-image facts; one filesystem with the work dir
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    ca_bundle: bytes | None = None
    timeout_seconds: float = 1800
    workers: int = 4


@dataclass
class Counts:
    """What happened to each blob; updated from the builder's worker threads."""

    uploaded: int = 0
    mounted: int = 0
    present: int = 0
    tarred: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def __str__(self) -> str:
        return (
            f"{self.uploaded} blob(s) uploaded, {self.mounted} mounted, "
            f"{self.present} already there; {self.tarred} layer(s) packed"
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


class NativeBuilder:
    def __init__(self, config: NativeConfig, *, cache: LayerCache | None = None) -> None:
        self._config = config
        self._cache = cache

    @property
    def platforms(self) -> tuple[Platform, ...]:
        return self._config.platforms

    def build(
        self,
        registry: RegistryClient,
        repository: str,
        *,
        base_registry: RegistryClient,
        base_image: str,
        model_dir: Path,
        python_version: str,
        requirements: str,
        labels: dict[str, str],
        work: Path,
        log: LogSink,
        derive_base: DeriveBase | None = None,
        expected_os_packages: tuple[str, ...] = (),
    ) -> NativeResult:
        """Write the image (an index for several platforms) to ``repository``, untagged.

        ``derive_base``: when the only obstacle is shared libraries that known Debian packages
        provide, get the base with those packages from it (one engine step, see ospackages.py)
        and build on that; only for a single platform (the engine builds for its own). The
        derived base is made while the wheels are packed and uploaded, and started before uv
        runs when ``expected_os_packages`` (what the requirements are known to need, e.g.
        libgomp1 for lightgbm) provide sonames the base lacks.
        """
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

        with ThreadPoolExecutor(self._config.workers, thread_name_prefix="native") as pool:
            model = pool.submit(self._model_layer, model_dir, work, registry, repository, counts)
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

    def _model_layer(
        self, model_dir: Path, work: Path, registry: RegistryClient, repository: str, counts: Counts
    ) -> layerlib.LayerDigests:
        path = work / "model-layer.tar.gz"
        with path.open("wb") as out:
            written = write_model_layer(model_dir, out, target=MODEL_DIR)
        layer = layerlib.LayerDigests(written.digest, written.diff_id, written.size)
        self._ensure_blob(registry, repository, layer.digest, path, counts)
        return layer

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

    def _shared_blob(
        self,
        registry: RegistryClient,
        repository: str,
        key: str,
        layer: layerlib.LayerDigests,
        data: bytes,
        counts: Counts,
    ) -> None:
        """A small layer every image shares (the virtualenv): mounted like package layers."""
        cached = self._cache.get(registry.host, key) if self._cache is not None else None
        if registry.blob_exists(repository, layer.digest):
            counts.add("present")
        elif (
            cached is not None
            and cached.repository != repository
            and registry.mount_blob(repository, layer.digest, cached.repository)
        ):
            counts.add("mounted")
        else:
            registry.upload_blob(repository, data, layer.digest)
            counts.add("uploaded")
        if self._cache is not None:
            entry = CachedLayer(layer.digest, layer.diff_id, layer.size, repository)
            self._cache.put(registry.host, key, entry, label=key)

    def _base_layer(
        self,
        registry: RegistryClient,
        repository: str,
        base: BaseImage,
        base_registry: RegistryClient,
        digest: str,
        counts: Counts,
    ) -> None:
        if registry.blob_exists(repository, digest):
            counts.add("present")
            return
        if base.host == registry.host and registry.mount_blob(repository, digest, base.repository):
            counts.add("mounted")
            return
        # Another registry (or one that does not mount): copy the blob through this worker.
        registry.upload_blob(repository, base_registry.get_blob(base.repository, digest), digest)
        counts.add("uploaded")

    def _package_layer(
        self,
        registry: RegistryClient,
        repository: str,
        group: layerlib.PackageGroup,
        site: Path,
        layout: layerlib.VenvLayout,
        work: Path,
        counts: Counts,
    ) -> layerlib.LayerDigests:
        host = registry.host
        cached = self._cache.get(host, group.key) if self._cache is not None else None
        if cached is not None:
            found = registry.blob_exists(repository, cached.digest)
            if found:
                counts.add("present")
            elif cached.repository != repository and registry.mount_blob(
                repository, cached.digest, cached.repository
            ):
                counts.add("mounted")
                found = True
            if found:
                self._remember(host, group, cached.digest, cached.diff_id, cached.size, repository)
                return layerlib.LayerDigests(cached.digest, cached.diff_id, cached.size)
        entries: list[layerlib.Entry] = []
        for dist in group.distributions:
            entries.extend(layerlib.distribution_entries(dist, site, layout))
        with tempfile.NamedTemporaryFile(dir=work, suffix=".tar.gz", delete=False) as out:
            path = Path(out.name)
            layer = layerlib.write_layer(entries, out)
        counts.add("tarred")
        try:
            self._ensure_blob(registry, repository, layer.digest, path, counts)
        finally:
            path.unlink(missing_ok=True)
        self._remember(host, group, layer.digest, layer.diff_id, layer.size, repository)
        return layer

    def _remember(
        self,
        host: str,
        group: layerlib.PackageGroup,
        digest: str,
        diff_id: str,
        size: int,
        repository: str,
    ) -> None:
        if self._cache is not None:
            self._cache.put(
                host, group.key, CachedLayer(digest, diff_id, size, repository), label=group.label
            )

    def _platform_image(
        self,
        pool: ThreadPoolExecutor,
        registry: RegistryClient,
        repository: str,
        *,
        plan: _Plan,
        base_registry: RegistryClient,
        python_version: str,
        model: Callable[[], layerlib.LayerDigests],
        labels: dict[str, str],
        work: Path,
        counts: Counts,
    ) -> Manifest:
        base, python, site, dists = plan.base, plan.python, plan.site, plan.dists
        major_minor = ".".join(python_version.split(".")[:2])
        layout = layerlib.VenvLayout(VENV_DIR, major_minor)
        sizes = {d.dist_info: layerlib.installed_size(d, site) for d in dists}
        # A derived base has one layer more than its parent (the apt step).
        base_layers = len(base.layers) + (1 if plan.derived is not None else 0)
        groups = layerlib.group_distributions(
            dists, sizes, layout, max_layers=layerlib.package_layer_budget(base_layers)
        )
        package_jobs = [
            pool.submit(
                self._package_layer, registry, repository, group, site, layout, work, counts
            )
            for group in groups
        ]
        if plan.derived is not None:
            # Packages are packed and uploaded meanwhile; they do not depend on the base.
            base, base_registry = plan.derived(), registry
        base_jobs = [
            pool.submit(
                self._base_layer,
                registry,
                repository,
                base,
                base_registry,
                str(layer["digest"]),
                counts,
            )
            for layer in base.layers
        ]
        venv_bytes, venv = _venv_layer(layout, python)
        venv_job = pool.submit(
            self._shared_blob,
            registry,
            repository,
            hashlib.sha256(f"venv:{venv.digest}".encode()).hexdigest(),
            venv,
            venv_bytes,
            counts,
        )
        for job in base_jobs:
            job.result()
        venv_job.result()
        package_layers = [job.result() for job in package_jobs]
        model_layer = model()

        created = _created()
        config = _config(
            base,
            labels=labels,
            created=created,
            history=[
                ("virtualenv " + VENV_DIR + f" (home {os.path.dirname(python)})", venv),
                *(
                    (f"uv pip install {group.label} # {CREATED_BY}", layer)
                    for group, layer in zip(groups, package_layers, strict=True)
                ),
                (f"COPY model/ {MODEL_DIR}/ # {CREATED_BY}", model_layer),
            ],
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
        for layer in (venv, *package_layers, model_layer):
            descriptors.append({"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size})
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": descriptors,
        }
        return Manifest.from_bytes(
            json.dumps(document, separators=(",", ":")).encode(), OCI_MANIFEST
        )


def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch.isdigit() else datetime.now(UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _venv_layer(layout: layerlib.VenvLayout, python: str) -> tuple[bytes, layerlib.LayerDigests]:
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
    buffer = io.BytesIO()
    digests = layerlib.write_layer(entries, buffer)
    return buffer.getvalue(), digests


def _env_list(base_env: list[str], updates: dict[str, str]) -> list[str]:
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
    history: list[tuple[str, layerlib.LayerDigests]],
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
