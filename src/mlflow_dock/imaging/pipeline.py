"""From a build request to a published tag: one strategy, the smoke test, the publisher.

A :class:`Pipeline` runs one :class:`~mlflow_dock.imaging.builder.Builder`, then the smoke policy
on what it made; the publisher stages it in the target repository by digest, the SBOM, signature
and provenance are attached to that digest (for an image the builder staged, while the smoke
test runs), its KServe Modelcar is written (modelcar.py), and only then does the version tag
name it.
:class:`Fallback` tries pipelines in order until one applies; :class:`OncePerRuntime` makes sure
one runtime is built once across every worker. The composition root (``app.py``) arranges them
from the settings, for example for the default engine-free builder::

    Fallback(
        Pipeline(AssembleOnEarlier(previous version of this model)),
        OncePerRuntime(
            assemble=Pipeline(AssembleOnEarlier(the runtime another build published)),
            build=Fallback(Pipeline(NativeBuilder), Pipeline(EngineRequired(LayeredBuilder))),
        ),
    )
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Protocol

from mlflow_dock.imaging.builder import Builder, BuildRequest, NotApplicable, StagedImage
from mlflow_dock.imaging.dockerfile import requirements_hash
from mlflow_dock.imaging.modelcar import CompanionPublisher, Companions, NoCompanions
from mlflow_dock.imaging.publisher import Publisher
from mlflow_dock.imaging.smokepolicy import SmokePolicy
from mlflow_dock.jobs.model import JobOutcome, LogSink
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.supply.sbom import KnownContents

__all__ = [
    "Attacher",
    "Fallback",
    "NoAttachments",
    "OncePerRuntime",
    "Pipeline",
    "Producer",
    "RuntimeLocks",
    "RuntimeMemory",
]


class Attacher(Protocol):
    """SBOM, signature and provenance for an image by digest (supply/attach.py)."""

    def attach(
        self,
        target: ImageRef,
        outcome: JobOutcome,
        log: LogSink,
        *,
        model_name: str,
        model_version: str,
        run_id: str | None,
        model_source: str | None,
        requirements_sha256: str,
        base_image: str,
        builder: str,
        job_id: str | None,
        contents: KnownContents | None = None,
    ) -> JobOutcome: ...


class NoAttachments:
    def attach(
        self, target: ImageRef, outcome: JobOutcome, log: LogSink, **_: object
    ) -> JobOutcome:
        return outcome


def with_companions(outcome: JobOutcome, companions: Companions) -> JobOutcome:
    return replace(outcome, modelcar=companions.modelcar, v2_model=companions.v2_model)


def attach(
    attacher: Attacher,
    request: BuildRequest,
    outcome: JobOutcome,
    contents: KnownContents | None = None,
) -> JobOutcome:
    """``outcome`` with the references of what was attached to its digest.

    ``contents``: what the builder knows that image holds (None: the attacher reads it).
    """
    return attacher.attach(
        request.target,
        outcome,
        request.log,
        model_name=request.model_name,
        model_version=request.version,
        run_id=request.run_id,
        model_source=request.source,
        requirements_sha256=requirements_hash(request.spec.requirements),
        base_image=request.spec.base_image,
        builder=request.builder,
        job_id=request.job_id,
        contents=contents,
    )


class Producer(Protocol):
    """Publishes the request's version tag, or raises NotApplicable (nothing published)."""

    @property
    def description(self) -> str: ...

    @property
    def means(self) -> str: ...

    def produce(self, request: BuildRequest) -> JobOutcome: ...


class Pipeline:
    def __init__(
        self,
        builder: Builder,
        *,
        smoke: SmokePolicy,
        publisher: Publisher,
        attacher: Attacher | None = None,
        companions: CompanionPublisher | None = None,
    ) -> None:
        self._builder = builder
        self._smoke = smoke
        self._publisher = publisher
        self._attacher: Attacher = attacher or NoAttachments()
        self._companions: CompanionPublisher = companions or NoCompanions()

    @property
    def description(self) -> str:
        return self._builder.description

    @property
    def means(self) -> str:
        return self._builder.means

    def produce(self, request: BuildRequest) -> JobOutcome:
        candidate = self._builder.build(request)
        if isinstance(candidate, StagedImage):
            # Stored by digest already: its SBOM, signature and provenance (a few registry round
            # trips, 0.1-0.4 s) are attached while the smoke test runs (0.2 s warm). Nothing is
            # visible before a tag, and none is written unless the test passed; a failed test
            # leaves them on an untagged digest, as it leaves the image itself.
            staged = candidate
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="attach") as pool:
                early = pool.submit(self._attach_staged, staged, request)
                note = self._smoke.check(candidate, request)
                attached = early.result()
            request.step("push")
        else:
            note = self._smoke.check(candidate, request)
            request.step("push")
            staged = self._publisher.stage(candidate, request)
            attached = self._attach_staged(staged, request)
        # Before the version tag: a tag never exists without its Modelcar, and a Modelcar only
        # ever names a model that passed its smoke test.
        companions = self._companions.publish(request, staged.manifest, speaks_v2=staged.speaks_v2)
        published = self._publisher.publish(staged, request)
        if published.digest != staged.digest:
            # The tag named another image already and was kept: that image is the outcome, and
            # attaching is idempotent, so it gets (or keeps) its own attachments and Modelcar.
            attached = attach(
                self._attacher,
                request,
                JobOutcome(image=published.reference, digest=published.digest),
            )
            companions = self._companions.publish(request, published.digest, speaks_v2=None)
        return replace(
            with_companions(attached, companions),
            image=published.reference,
            digest=published.digest,
            tags=(published.reference,),
            note=published.note or note,
        )

    def _attach_staged(self, staged: StagedImage, request: BuildRequest) -> JobOutcome:
        staged_ref = str(request.target.with_digest(staged.digest))
        return attach(
            self._attacher,
            request,
            JobOutcome(image=staged_ref, digest=staged.digest),
            staged.contents,
        )


class Fallback:
    """The first producer that applies; each refusal is logged with what is tried next."""

    def __init__(self, *producers: Producer) -> None:
        self._producers = producers

    @property
    def description(self) -> str:
        return self._producers[0].description

    @property
    def means(self) -> str:
        return self._producers[0].means

    def produce(self, request: BuildRequest) -> JobOutcome:
        refusals: list[NotApplicable] = []
        for position, producer in enumerate(self._producers):
            try:
                return producer.produce(request)
            except NotApplicable as exc:
                refusals.append(exc)
                following = self._producers[position + 1 :]
                if following and not exc.quiet:
                    request.log(
                        f"{producer.description} not possible ({exc.reason}); "
                        f"building with {following[0].means}"
                    )
        raise _no_way_left(refusals)


def _no_way_left(refusals: Sequence[NotApplicable]) -> NotApplicable:
    """The refusal that tells the user most: the first that was not a mere "nothing to reuse"."""
    telling = [exc for exc in refusals if not exc.quiet] or list(refusals)
    first = telling[0]
    message = f"{first.reason}: {first.hint}" if first.hint else first.reason
    return NotApplicable(message, quiet=all(exc.quiet for exc in refusals))


class RuntimeMemory(Protocol):
    """Which image of a runtime (by key) a build published to a repository (the job store)."""

    def runtime_image(self, key: str, repository: str) -> str | None: ...

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None: ...


class RuntimeLocks(Protocol):
    """Deployment-wide mutual exclusion: one worker builds a given runtime at a time."""

    def hold(self, name: str) -> AbstractContextManager[None]: ...


class OncePerRuntime:
    """One build per new runtime, across this worker's threads and every other worker.

    Concurrent versions needing the same new runtime wait for the one building it, then
    assemble on what it published instead of installing the same requirements again. Only the
    build holds the lock, not the assemblies after it. The new runtime's digest is remembered
    before the lock is let go: the builds waiting for it read that, not the building job's
    outcome, which is only recorded after the job returns.
    """

    def __init__(
        self,
        *,
        assemble: Producer,
        build: Producer,
        memory: RuntimeMemory,
        locks: RuntimeLocks,
    ) -> None:
        self._assemble = assemble
        self._build = build
        self._memory = memory
        self._locks = locks
        # The store's lease is the owner's, whichever thread asks: two threads of one process
        # would both "hold" it, so threads take a local lock first.
        self._guard = threading.Lock()
        self._local: dict[str, threading.Lock] = {}

    @property
    def description(self) -> str:
        return self._build.description

    @property
    def means(self) -> str:
        return self._build.means

    def produce(self, request: BuildRequest) -> JobOutcome:
        key, repository = request.runtime_key, request.target.repository
        if self._memory.runtime_image(key, repository) is None:
            with self._lock(key):
                # Whoever held the lock before may have published this runtime meanwhile.
                if self._memory.runtime_image(key, repository) is None:
                    return self._new_runtime(request)
        try:
            return self._assemble.produce(request)
        except NotApplicable as exc:
            request.log(
                f"{self._assemble.description} not possible ({exc.reason}); "
                f"building with {self._build.means}"
            )
        with self._lock(key):
            return self._new_runtime(request)

    def _new_runtime(self, request: BuildRequest) -> JobOutcome:
        published = self._build.produce(request)
        self._memory.remember_runtime_image(
            request.runtime_key, request.target.repository, published.digest
        )
        return published

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        with self._guard:
            local = self._local.setdefault(key, threading.Lock())
        with local, self._locks.hold(f"runtime:{key}"):
            yield


class NoRuntimeLocks:
    """For a single process (tests, `mlflow-dock build`): the local lock is all there is."""

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        yield
