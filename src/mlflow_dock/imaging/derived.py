"""Derived bases: the base image plus Debian packages its libraries need (see ospackages.py).

The native builder's one use of an engine. A base that lacks, say, libgomp.so.1 for lightgbm is
extended once by an engine running only ``apt-get install`` on it, pushed to the target registry
as ``mlflow-dock-base:os-<hash of base digest and packages>``, and reused by every later build
on that base without an engine. The engine step runs in the background while the native builder
packs and uploads the wheels.

Every later image of every team is built on a derived base, so where it comes from matters: it
is found by the digest the job store recorded when this service pushed it. A worker whose store
never saw it (a fresh installation on a registry that has it) looks at the content tag in the
reserved ``mlflow-dock-base`` repository, which no model name or alias can write to
(oci/reference.py), checks that the image says it was derived from this base with these
packages, and records its digest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow_dock.imaging import ospackages
from mlflow_dock.imaging.baseimage import BaseImage
from mlflow_dock.imaging.engine import EngineTransfers
from mlflow_dock.imaging.pipeline import RuntimeLocks, RuntimeMemory
from mlflow_dock.jobs.model import LogSink
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.oci.remote import RegistryClient

__all__ = ["EngineDerivedBases", "ExistingDerivedBases"]


DERIVED_FROM_LABEL = "io.mlflow-dock.derived-from"
OS_PACKAGES_LABEL = "io.mlflow-dock.os-packages"


def _memory_key(tag: str) -> str:
    return f"os-base:{tag}"


class ExistingDerivedBases:
    """Only what an earlier build made: found in the registry, never built (no engine)."""

    def __init__(self, repository: ImageRef, *, memory: RuntimeMemory) -> None:
        self.repository = repository  # where derived bases live in the target registry
        self._memory = memory

    def find(
        self, registry: RegistryClient, base: BaseImage, packages: tuple[str, ...]
    ) -> str | None:
        """The derived base as "path@digest" if it is in the registry."""
        path = self.repository.path
        tag = ospackages.derived_tag(base.manifest.digest, packages)
        recorded = self._memory.runtime_image(_memory_key(tag), self.repository.repository)
        if recorded is not None and registry.manifest_digest(path, recorded) is not None:
            return f"{path}@{recorded}"
        digest = registry.manifest_digest(path, tag)
        if digest is None or not self._made_from(registry, digest, base, packages):
            return None
        self.remember(tag, digest)
        return f"{path}@{digest}"

    def remember(self, tag: str, digest: str) -> None:
        self._memory.remember_runtime_image(_memory_key(tag), self.repository.repository, digest)

    def _made_from(
        self, registry: RegistryClient, digest: str, base: BaseImage, packages: tuple[str, ...]
    ) -> bool:
        """Does the image at ``digest`` say it is ``base`` + ``packages`` (its labels)?"""
        path = self.repository.path
        document = json.loads(registry.get_manifest(path, digest).body)
        config = registry.get_blob(path, str(document.get("config", {}).get("digest", "")))
        labels = (json.loads(config).get("config") or {}).get("Labels") or {}
        source = f"{base.host}/{base.repository}@{base.manifest.digest}"
        return bool(
            labels.get(DERIVED_FROM_LABEL) == source
            and labels.get(OS_PACKAGES_LABEL) == " ".join(packages)
        )

    def derive(
        self,
        registry: RegistryClient,
        base: BaseImage,
        packages: tuple[str, ...],
        *,
        work: Path,
        log: LogSink,
    ) -> Callable[[], str] | None:
        found = self.find(registry, base, packages)
        if found is None:
            return None
        tag = ospackages.derived_tag(base.manifest.digest, packages)
        log(f"reusing derived base {self.repository.repository}:{tag} ({' '.join(packages)})")
        return lambda: found


class EngineDerivedBases(ExistingDerivedBases):
    """Found as above, or built by the engine (once across workers) and pushed."""

    def __init__(
        self,
        repository: ImageRef,
        *,
        memory: RuntimeMemory,
        engine: EngineTransfers,
        locks: RuntimeLocks,
        prepare_repository: Callable[[ImageRef], None],
        timeout_seconds: int,
    ) -> None:
        super().__init__(repository, memory=memory)
        self._engine = engine
        self._locks = locks
        self._prepare_repository = prepare_repository
        self._timeout = timeout_seconds

    def derive(
        self,
        registry: RegistryClient,
        base: BaseImage,
        packages: tuple[str, ...],
        *,
        work: Path,
        log: LogSink,
    ) -> Callable[[], str] | None:
        found = super().derive(registry, base, packages, work=work, log=log)
        if found is not None:
            return found
        if not self._engine.reachable():
            return None
        executor = ThreadPoolExecutor(1, thread_name_prefix="derived-base")
        future = executor.submit(self._build, registry, base, packages, work, log)
        executor.shutdown(wait=False)
        return future.result

    def _build(
        self,
        registry: RegistryClient,
        base: BaseImage,
        packages: tuple[str, ...],
        context: Path,
        log: LogSink,
    ) -> str:
        derived = self.repository
        tag = ospackages.derived_tag(base.manifest.digest, packages)
        engine = self._engine.engine
        # One worker builds it; the others wait and then find it.
        with self._locks.hold(f"os-base:{tag}"):
            found = self.find(registry, base, packages)
            if found is not None:
                return found
            self._prepare_repository(derived)
            source = f"{base.host}/{base.repository}"
            if base.host == registry.host:
                # With the target's credentials, refreshed once if a cloud token was refused.
                self._engine.pull(source, base.manifest.digest)
            else:
                engine.pull(source, base.manifest.digest, username="", password="")
            context.mkdir(parents=True, exist_ok=True)
            (context / "Dockerfile").write_text(
                ospackages.render_derived_dockerfile(f"{source}@{base.manifest.digest}", packages)
            )
            engine.build(
                context,
                extra_files={},
                tag=str(derived.with_tag(tag)),
                labels={
                    DERIVED_FROM_LABEL: f"{source}@{base.manifest.digest}",
                    OS_PACKAGES_LABEL: " ".join(packages),
                },
                log=log,
                timeout=self._timeout,
            )
            pushed = self._engine.push(derived.repository, tag, log)
            self.remember(tag, pushed.digest)
        log(f"pushed derived base {derived.repository}:{tag}@{pushed.digest}")
        return f"{derived.path}@{pushed.digest}"
