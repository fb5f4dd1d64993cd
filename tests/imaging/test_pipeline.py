"""The fallback order and one-build-per-runtime, with fake strategies (imaging/pipeline.py)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.builder import BuildRequest, NotApplicable, StagedImage
from mlflow_dock.imaging.pipeline import Fallback, NoRuntimeLocks, OncePerRuntime, Pipeline
from mlflow_dock.imaging.publisher import Published
from mlflow_dock.jobs.model import JobOutcome
from support.fakes import build_request as request


@dataclass
class Producer:
    description: str
    means: str
    refusal: NotApplicable | None = None
    runs: list[str] = field(default_factory=list)

    def produce(self, request: BuildRequest) -> Published:
        self.runs.append(request.version)
        if self.refusal is not None:
            raise self.refusal
        return Published(f"{request.target}:{request.tag}", "sha256:" + "a" * 64)


def test_fallback_logs_each_refusal_with_what_comes_next(tmp_path: Path) -> None:
    log: list[str] = []
    native = Producer("native build", "the native builder", NotApplicable("no wheel for x"))
    engine = Producer("engine build", "the engine")
    published = Fallback(native, engine).produce(request(tmp_path, log))
    assert published.digest.endswith("a" * 64) and engine.runs == ["1"]
    assert log == ["native build not possible (no wheel for x); building with the engine"]


def test_a_quiet_refusal_is_not_logged(tmp_path: Path) -> None:
    log: list[str] = []
    previous = Producer("registry assembly", "x", NotApplicable("nothing earlier", quiet=True))
    Fallback(previous, Producer("engine build", "the engine")).produce(request(tmp_path, log))
    assert log == []


def test_when_nothing_applies_the_first_telling_refusal_and_its_hint_are_the_error(
    tmp_path: Path,
) -> None:
    log: list[str] = []
    chain = Fallback(
        Producer("registry assembly", "a", NotApplicable("nothing earlier", quiet=True)),
        Producer("native build", "b", NotApplicable("needs libfoo", hint="add an engine")),
        Producer("engine build", "c", NotApplicable("no engine answers", quiet=True)),
    )
    with pytest.raises(NotApplicable, match=r"^needs libfoo: add an engine$"):
        chain.produce(request(tmp_path, log))


@dataclass
class Memory:
    runtimes: dict[tuple[str, str], str] = field(default_factory=dict)

    def runtime_image(self, key: str, repository: str) -> str | None:
        return self.runtimes.get((key, repository))

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None:
        self.runtimes[(key, repository)] = digest


@dataclass
class Locks:
    held: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def hold(self, name: str):  # type: ignore[no-untyped-def]
        self.held.append(name)
        yield


def test_a_new_runtime_is_built_under_its_lock_and_remembered(tmp_path: Path) -> None:
    memory, locks = Memory(), Locks()
    assemble, build = Producer("registry assembly", "a"), Producer("engine build", "b")
    once = OncePerRuntime(assemble=assemble, build=build, memory=memory, locks=locks)
    published = once.produce(request(tmp_path, []))
    assert build.runs == ["1"] and assemble.runs == [] and locks.held == ["runtime:key"]
    assert memory.runtimes == {("key", "registry.test/team/m"): published.digest}


def test_a_known_runtime_is_assembled_on_without_the_lock(tmp_path: Path) -> None:
    memory, locks = Memory({("key", "registry.test/team/m"): "sha256:" + "b" * 64}), Locks()
    assemble, build = Producer("registry assembly", "a"), Producer("engine build", "b")
    OncePerRuntime(assemble=assemble, build=build, memory=memory, locks=locks).produce(
        request(tmp_path, [])
    )
    assert assemble.runs == ["1"] and build.runs == [] and locks.held == []


def test_a_runtime_that_cannot_be_assembled_on_is_built_again_under_the_lock(
    tmp_path: Path,
) -> None:
    log: list[str] = []
    memory = Memory({("key", "registry.test/team/m"): "sha256:" + "b" * 64})
    assemble = Producer("registry assembly", "a", NotApplicable("manifest unknown"))
    build = Producer("engine build", "the engine")
    once = OncePerRuntime(assemble=assemble, build=build, memory=memory, locks=NoRuntimeLocks())
    once.produce(request(tmp_path, log))
    assert build.runs == ["1"]
    assert log == ["registry assembly not possible (manifest unknown); building with the engine"]


def test_a_staged_image_is_named_by_its_manifest_digest() -> None:
    from mlflow_dock.oci.manifest import Manifest

    manifest = Manifest.from_bytes(b"{}", "application/vnd.oci.image.manifest.v1+json")
    assert StagedImage(manifest).digest == manifest.digest


@dataclass
class StagingBuilder:
    description: str = "registry assembly"
    means: str = "an earlier image"

    def build(self, request: BuildRequest) -> StagedImage:
        from mlflow_dock.oci.manifest import Manifest

        manifest = Manifest.from_bytes(b"{}", "application/vnd.oci.image.manifest.v1+json")
        return StagedImage(manifest, tested_on="sha256:" + "c" * 64)


@dataclass
class Events:
    seen: list[str] = field(default_factory=list)
    attached: threading.Event = field(default_factory=threading.Event)
    smoke_error: Exception | None = None

    # The smoke policy: waits (bounded) for the attacher, which runs meanwhile.
    def check(self, candidate: object, request: BuildRequest) -> None:
        self.seen.append(f"smoke started, attached: {self.attached.wait(10)}")
        if self.smoke_error is not None:
            raise self.smoke_error

    def attach(self, target: object, outcome: JobOutcome, log: object, **_: object) -> JobOutcome:
        self.seen.append(f"attach {outcome.digest[:9]}")
        self.attached.set()
        return replace(outcome, sbom="sbom-ref")

    # The publisher.
    def stage(self, candidate: StagedImage, request: BuildRequest) -> StagedImage:
        return candidate

    def publish(self, staged: StagedImage, request: BuildRequest) -> Published:
        self.seen.append("tag")
        return Published(f"{request.target}:{request.tag}", staged.digest)


def pipeline(events: Events) -> Pipeline:
    return Pipeline(StagingBuilder(), smoke=events, publisher=events, attacher=events)  # type: ignore[arg-type]


def test_an_image_staged_by_its_builder_gets_its_attachments_while_the_smoke_test_runs(
    tmp_path: Path,
) -> None:
    events = Events()
    outcome = pipeline(events).produce(request(tmp_path, []))
    assert events.seen[1:] == ["smoke started, attached: True", "tag"]
    assert outcome.sbom == "sbom-ref" and outcome.tags == ("registry.test/team/m:1",)


def test_a_failed_smoke_test_writes_no_tag_whatever_was_attached(tmp_path: Path) -> None:
    events = Events(smoke_error=PermanentError("smoke test: /invocations answered 500"))
    with pytest.raises(PermanentError, match="answered 500"):
        pipeline(events).produce(request(tmp_path, []))
    assert "tag" not in events.seen
