"""Unit tests for mlflow_dock.build.runner with fakes at its edges (MLflow, engine, registry).

The real engine, registry and MLflow round trips are the integration tests' job; these pin down
the runner's own decisions: which path a version takes, what is smoke-tested before anything is
published, how aliases find their digest, and what happens when a step fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlflow_dock.build.baseimage import BaseFacts, BaseImage
from mlflow_dock.build.engine import PushResult
from mlflow_dock.build.ospackages import derived_tag
from mlflow_dock.build.runner import RUNTIME_KEY_LABEL, BuildConfig, JobRunner
from mlflow_dock.build.wheels import Platform
from mlflow_dock.cloud.credentials import StaticCredentials
from mlflow_dock.errors import PermanentError
from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.mlflow.client import ModelPackage, ModelVersionInfo
from mlflow_dock.oci.manifest import Manifest
from mlflow_dock.oci.remote import RegistryPermanentError
from support.fakes import RotatingCredentials

REGISTRY = "127.0.0.1:5000"
MODEL = "fraud-model"
REPOSITORY = f"{REGISTRY}/team/{MODEL}"
DIGEST_1 = "sha256:" + "1" * 64
DIGEST_2 = "sha256:" + "2" * 64


class FakeSource:
    def __init__(self, requirements: str = "scikit-learn==1.5.0\n") -> None:
        self.requirements = requirements

    def get_version(self, name: str, version: str) -> ModelVersionInfo:
        return ModelVersionInfo(name, version, "models:/m-1", "run-1", "READY")

    def download(self, name: str, version: str, dest: Path) -> ModelPackage:
        dest.mkdir(parents=True)
        (dest / "MLmodel").write_text(f"version: {version}\n")
        (dest / "requirements.txt").write_text(self.requirements)
        (dest / "serving_input_example.json").write_text('{"inputs": [[1, 2]]}')
        return ModelPackage(dest, "3.11", self.requirements, has_serving_example=True)


@dataclass
class FakeEngine:
    images: set[str] = field(default_factory=set)
    builds: list[tuple[str, dict[str, str], str]] = field(default_factory=list)
    pushes: list[tuple[str, str]] = field(default_factory=list)
    pulls: list[tuple[str, str]] = field(default_factory=list)
    push_errors: list[Exception] = field(default_factory=list)

    def image_exists(self, reference: str) -> bool:
        return reference in self.images

    def ping(self) -> None:
        return None

    def build(self, context: Path, *, extra_files, tag, labels, log, timeout) -> None:
        self.builds.append((tag, dict(labels), (context / "Dockerfile").read_text()))
        self.images.add(tag)

    def push(self, repository: str, tag: str, *, username, password, log) -> PushResult:
        if self.push_errors:
            raise self.push_errors.pop(0)
        self.pushes.append((repository, tag))
        return PushResult(reference=f"{repository}:{tag}", digest=DIGEST_1)

    def pull(self, repository: str, reference: str, *, username, password) -> None:
        self.pulls.append((repository, reference))


@dataclass
class FakeSmoke:
    checked: list[str] = field(default_factory=list)
    fail: bool = False

    def check(self, image: str, example: Path | None, log) -> None:
        self.checked.append(image)
        if self.fail:
            raise PermanentError("smoke test: the container exited before answering /ping")


@dataclass
class FakeRegistry:
    """The registry calls alias jobs make; records what was tagged or deleted."""

    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    can_delete: bool = True
    manifests: dict[str, bool] = field(default_factory=dict)
    host: str = REGISTRY

    def __enter__(self) -> FakeRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def tag(self, path: str, digest: str, tag: str) -> str:
        self.tags[(path, tag)] = digest
        return digest

    def manifest_digest(self, path: str, reference: str) -> str | None:
        return self.tags.get((path, reference))

    def delete_tag(self, path: str, tag: str) -> bool:
        if not self.can_delete:
            return False
        self.tags.pop((path, tag), None)
        return True

    def get_manifest(self, path: str, reference: str) -> None:
        raise RegistryPermanentError("manifest not found", status_code=404)


@dataclass
class FakeHistory:
    builds: dict[tuple[str, str], Job] = field(default_factory=dict)
    previous: Job | None = None

    def latest_image(self, model_name: str, *, repository: str, exclude_version: str) -> Job | None:
        return self.previous

    def build_for(self, model_name: str, version: str) -> Job | None:
        return self.builds.get((model_name, version))

    runtimes: dict[tuple[str, str], str] = field(default_factory=dict)

    def runtime_image(self, key: str, repository: str) -> str | None:
        return self.runtimes.get((key, repository))

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None:
        self.runtimes[(key, repository)] = digest


@dataclass
class Parts:
    runner: JobRunner
    engine: FakeEngine
    smoke: FakeSmoke
    registry: FakeRegistry
    history: FakeHistory
    log: list[str]


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return make_parts(tmp_path)


def make_parts(tmp_path: Path, *, credentials=None, smoke: bool = True) -> Parts:
    engine, fake_smoke, registry, history = FakeEngine(), FakeSmoke(), FakeRegistry(), FakeHistory()
    runner = JobRunner(
        config=BuildConfig(work_dir=tmp_path / "work", registry=REGISTRY, namespace="team"),
        history=history,
        source=FakeSource(),  # type: ignore[arg-type]
        engine=engine,  # type: ignore[arg-type]
        credentials=credentials or StaticCredentials(username="u", password="p"),
        registry_factory=lambda host: registry,  # type: ignore[arg-type,return-value]
        smoke=fake_smoke if smoke else None,  # type: ignore[arg-type]
    )
    return Parts(runner, engine, fake_smoke, registry, history, [])


def build_job(version: str = "1") -> Job:
    return Job(
        id=f"job-{version}",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version=version,
        state=JobState.RUNNING,
        attempts=1,
    )


def test_first_version_builds_runtime_then_version_smoke_tests_then_pushes(parts: Parts) -> None:
    outcome = parts.runner.run(build_job("1"), parts.log.append)

    (runtime_tag, runtime_labels, _), (version_tag, _, dockerfile) = parts.engine.builds
    assert runtime_tag.startswith("mlflow-dock-runtime:")
    assert RUNTIME_KEY_LABEL in runtime_labels
    assert version_tag == f"{REPOSITORY}:1"
    assert dockerfile.startswith(f"FROM {runtime_tag}")
    # Smoke-tested under the local tag before the push publishes anything.
    assert parts.smoke.checked == [f"{REPOSITORY}:1"]
    assert parts.engine.pushes == [(REPOSITORY, "1")]
    assert (outcome.image, outcome.digest, outcome.tags) == (
        f"{REPOSITORY}:1",
        DIGEST_1,
        (f"{REPOSITORY}:1",),
    )
    assert any(line.startswith("published ") for line in parts.log)


def test_same_requirements_reuse_the_runtime_image(parts: Parts) -> None:
    parts.runner.run(build_job("1"), parts.log.append)
    parts.runner.run(build_job("2"), parts.log.append)
    runtime_builds = [t for t, _, _ in parts.engine.builds if t.startswith("mlflow-dock-runtime")]
    assert len(runtime_builds) == 1
    assert any("reusing runtime image" in line for line in parts.log)


def test_failed_smoke_test_publishes_nothing(parts: Parts) -> None:
    parts.smoke.fail = True
    with pytest.raises(PermanentError, match="smoke test"):
        parts.runner.run(build_job("1"), parts.log.append)
    assert parts.engine.pushes == []


def test_previous_image_missing_from_registry_falls_back_to_the_engine(parts: Parts) -> None:
    parts.history.previous = Job(
        id="old",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version="1",
        state=JobState.SUCCEEDED,
        digest=DIGEST_2,
    )
    outcome = parts.runner.run(build_job("2"), parts.log.append)
    assert any("registry assembly not possible" in line for line in parts.log)
    assert parts.engine.pushes == [(REPOSITORY, "2")] and outcome.digest == DIGEST_1


def test_work_directory_is_removed_after_success_and_failure(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    parts.runner.run(build_job("1"), parts.log.append)
    parts.smoke.fail = True
    with contextlib.suppress(PermanentError):
        parts.runner.run(build_job("2"), parts.log.append)
    assert list((tmp_path / "work").iterdir()) == []


def test_a_refused_push_gets_one_fresh_cloud_token(tmp_path: Path) -> None:
    credentials = RotatingCredentials()
    parts = make_parts(tmp_path, credentials=credentials, smoke=False)
    parts.engine.push_errors.append(PermanentError("denied: token expired"))
    parts.runner.run(build_job("1"), parts.log.append)
    assert credentials.invalidated == 1 and parts.engine.pushes == [(REPOSITORY, "1")]


def test_a_refused_push_with_a_static_password_is_not_retried(tmp_path: Path) -> None:
    parts = make_parts(tmp_path, smoke=False)
    parts.engine.push_errors.append(PermanentError("denied"))
    with pytest.raises(PermanentError, match="denied"):
        parts.runner.run(build_job("1"), parts.log.append)


def alias_job(kind: JobKind = JobKind.ALIAS, alias: str = "champion") -> Job:
    return Job(
        id="a-1",
        kind=kind,
        model_name=MODEL,
        version="1",
        alias=alias,
        state=JobState.RUNNING,
        attempts=1,
    )


def test_alias_points_at_the_digest_the_version_build_recorded(parts: Parts) -> None:
    parts.history.builds[(MODEL, "1")] = Job(
        id="b",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version="1",
        state=JobState.SUCCEEDED,
        digest=DIGEST_2,
    )
    outcome = parts.runner.run(alias_job(), parts.log.append)
    assert parts.registry.tags == {(f"team/{MODEL}", "champion"): DIGEST_2}
    assert outcome.image == f"{REPOSITORY}:champion" and outcome.digest == DIGEST_2


def test_alias_of_a_version_without_image_fails_with_the_builds_reason(parts: Parts) -> None:
    parts.history.builds[(MODEL, "1")] = Job(
        id="b",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version="1",
        state=JobState.FAILED,
        error="smoke test: boom",
    )
    with pytest.raises(PermanentError, match="has no image: smoke test: boom"):
        parts.runner.run(alias_job(), parts.log.append)
    assert parts.registry.tags == {}


def test_unalias_of_a_missing_tag_is_a_success_with_a_note(parts: Parts) -> None:
    outcome = parts.runner.run(alias_job(JobKind.UNALIAS), parts.log.append)
    assert outcome.note == "tag did not exist"


def test_unalias_where_the_registry_cannot_delete_tags_leaves_it_and_says_why(
    parts: Parts,
) -> None:
    parts.registry.tags[(f"team/{MODEL}", "champion")] = DIGEST_1
    parts.registry.can_delete = False
    outcome = parts.runner.run(alias_job(JobKind.UNALIAS), parts.log.append)
    assert outcome.digest == DIGEST_1
    assert outcome.note is not None and "left in place" in outcome.note
    assert (f"team/{MODEL}", "champion") in parts.registry.tags


class FakeSupply:
    """Records what the runner asks to attach; the real thing is tests/supply/test_attach.py."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def attach(self, target, outcome, log, **facts):  # type: ignore[no-untyped-def]
        self.calls.append({"image": outcome.image, "digest": outcome.digest, **facts})
        return dataclasses.replace(outcome, sbom=f"{target.repository}@sha256:{'5' * 64}")


def supplied_parts(tmp_path: Path) -> tuple[Parts, FakeSupply]:
    parts, supply = make_parts(tmp_path), FakeSupply()
    parts.runner._supply = supply  # type: ignore[assignment]
    return parts, supply


def test_a_published_version_gets_its_supply_chain_artifacts(tmp_path: Path) -> None:
    parts, supply = supplied_parts(tmp_path)
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    (call,) = supply.calls
    assert call["digest"] == DIGEST_1 and call["model_version"] == "1"
    assert call["run_id"] == "run-1" and call["model_source"] == "models:/m-1"
    assert call["job_id"] == "job-1" and call["builder"] == "layered"
    assert outcome.sbom == f"{REPOSITORY}@sha256:{'5' * 64}"


def test_an_adopted_version_is_attached_again(tmp_path: Path) -> None:
    # A re-run after a lost lease adopts the published tag; its first run may have died
    # between publishing and attaching, and attaching again is idempotent.
    parts, supply = supplied_parts(tmp_path)
    parts.registry.tags[(f"team/{MODEL}", "1")] = DIGEST_1
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert parts.engine.builds == []
    assert [c["digest"] for c in supply.calls] == [DIGEST_1]
    assert outcome.sbom is not None


def test_a_version_tag_already_in_the_registry_is_adopted_not_moved(parts: Parts) -> None:
    # A job re-run after a lost lease: its first run published before it lost the store.
    parts.registry.tags[(f"team/{MODEL}", "1")] = DIGEST_1
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert parts.engine.builds == [] and parts.engine.pushes == []
    assert (outcome.image, outcome.digest) == (f"{REPOSITORY}:1", DIGEST_1)


@dataclass
class RecordingLocks:
    """The deployment-wide runtime locks, recording what happened around each hold."""

    history: FakeHistory
    events: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def hold(self, name: str):  # type: ignore[no-untyped-def]
        self.events.append(f"locked {name.split(':', 1)[0]}")
        yield
        self.events.append(f"released, runtime known: {bool(self.history.runtimes)}")


def recording_locks(parts: Parts) -> RecordingLocks:
    locks = RecordingLocks(parts.history)
    parts.runner._runtime_locks_shared = locks  # the runner's only collaborator not in Parts
    return locks


def test_the_runtime_build_holds_the_deployment_wide_lock(parts: Parts) -> None:
    locks = recording_locks(parts)
    parts.runner.run(build_job("1"), parts.log.append)
    assert locks.events[0] == "locked runtime" and len(locks.events) == 2


def test_a_version_tag_that_appears_during_the_build_is_kept_not_moved(parts: Parts) -> None:
    """Checked right before the push too: another run (whose lease this one took over while it
    was only paused) published while this one was building."""
    build = parts.engine.build

    def build_then_other_run_publishes(context, **kwargs) -> None:
        build(context, **kwargs)
        if kwargs["tag"] == f"{REPOSITORY}:1":
            parts.registry.tags[(f"team/{MODEL}", "1")] = DIGEST_2

    parts.engine.build = build_then_other_run_publishes  # type: ignore[method-assign]
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert parts.engine.pushes == []
    assert outcome.digest == DIGEST_2 and outcome.note is not None
    assert "never move" in outcome.note


def _base() -> BaseImage:
    return BaseImage(
        host="127.0.0.1:5000",
        repository="base/debian",
        platform=Platform.parse("linux/amd64"),
        manifest=Manifest.from_bytes(b"{}", "application/vnd.oci.image.manifest.v1+json"),
        config={},
        layers=(),
        facts=BaseFacts(glibc=(2, 36), pythons={}, libraries=frozenset()),
    )


def derive_libgomp(parts: Parts, base: BaseImage, tmp_path: Path):  # type: ignore[no-untyped-def]
    return parts.runner._derived_base(
        parts.registry,  # type: ignore[arg-type]
        base,
        ("libgomp1",),
        tmp_path / "ctx",
        parts.log.append,
    )


def test_a_derived_base_is_built_once_with_apt_and_pushed_under_its_content_tag(
    parts: Parts, tmp_path: Path
) -> None:
    base = _base()
    waiter = derive_libgomp(parts, base, tmp_path)
    assert waiter is not None
    tag = derived_tag(base.manifest.digest, ["libgomp1"])
    assert waiter() == f"team/mlflow-dock-base@{DIGEST_1}"
    assert parts.engine.pulls == [("127.0.0.1:5000/base/debian", base.manifest.digest)]
    (built, labels, dockerfile) = parts.engine.builds[0]
    assert built == f"{REGISTRY}/team/mlflow-dock-base:{tag}"
    assert dockerfile.startswith(f"FROM 127.0.0.1:5000/base/debian@{base.manifest.digest}")
    assert "libgomp1" in dockerfile and labels["io.mlflow-dock.os-packages"] == "libgomp1"
    assert parts.engine.pushes == [(f"{REGISTRY}/team/mlflow-dock-base", tag)]


def test_an_existing_derived_base_is_reused_without_an_engine(parts: Parts, tmp_path: Path):
    base = _base()
    tag = derived_tag(base.manifest.digest, ["libgomp1"])
    parts.registry.tags[("team/mlflow-dock-base", tag)] = DIGEST_2
    waiter = derive_libgomp(parts, base, tmp_path)
    assert waiter is not None and waiter() == f"team/mlflow-dock-base@{DIGEST_2}"
    assert parts.engine.builds == [] and parts.engine.pulls == []


def test_a_base_pull_refused_for_a_cloud_token_gets_one_fresh_token(tmp_path: Path) -> None:
    credentials = RotatingCredentials()
    parts = make_parts(tmp_path, credentials=credentials)
    pull = parts.engine.pull
    refusals = [PermanentError("pulling base: unauthorized: authentication required")]

    def pull_refused_once(repository: str, reference: str, *, username, password) -> None:
        if refusals:
            raise refusals.pop()
        assert password == "token-1"
        pull(repository, reference, username=username, password=password)

    parts.engine.pull = pull_refused_once  # type: ignore[method-assign]
    base = _base()
    waiter = derive_libgomp(parts, base, tmp_path)
    assert waiter is not None
    waiter()
    assert credentials.invalidated == 1
    assert parts.engine.pulls == [("127.0.0.1:5000/base/debian", base.manifest.digest)]


def test_a_new_runtime_is_remembered_before_its_lock_is_let_go(parts: Parts) -> None:
    locks = recording_locks(parts)
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert locks.events == ["locked runtime", "released, runtime known: True"]
    assert list(parts.history.runtimes.values()) == [outcome.digest]
    assert [key[1] for key in parts.history.runtimes] == [REPOSITORY]


def test_a_runtime_another_build_published_is_assembled_on_not_built_again(
    parts: Parts,
) -> None:
    """A version that waited for (or came after) the build of its runtime assembles on that
    image; only when that is impossible does it build, under the lock again."""
    locks = recording_locks(parts)
    parts.runner.run(build_job("1"), parts.log.append)
    assert len(locks.events) == 2
    parts.log.clear()
    # Version 1's job has not recorded its outcome (history.previous is None), but its
    # runtime image is known: version 2 tries to assemble on it first.
    parts.runner.run(build_job("2"), parts.log.append)
    assert any("registry assembly not possible" in line for line in parts.log), parts.log
    assert len(locks.events) == 4  # the fake registry cannot assemble: built under the lock again
