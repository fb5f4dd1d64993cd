"""Unit tests for mlflow_dock.imaging.runner with fakes at its edges (MLflow, engine, registry).

The build handler runs here on the layered strategies composed as app.py composes them for
MLFLOW_DOCK_BUILDER=layered. The real engine, registry and MLflow round trips are the
integration tests' job; these pin down the decisions: which strategy a version takes, what is
smoke-tested before anything is published, how aliases find their digest, and what happens when
a step fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlflow_dock.cloud.static import StaticCredentials
from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.builder import RUNTIME_KEY_LABEL
from mlflow_dock.imaging.engine import EngineTransfers
from mlflow_dock.imaging.layered import LayeredBuilder
from mlflow_dock.imaging.modelcar import Companions
from mlflow_dock.imaging.pipeline import Fallback, OncePerRuntime, Pipeline
from mlflow_dock.imaging.previous import AssembleOnEarlier, previous_version, remembered_runtime
from mlflow_dock.imaging.publisher import Publisher
from mlflow_dock.imaging.requirements import RequirementRefused, RequirementsPolicy
from mlflow_dock.imaging.runner import (
    AliasHandler,
    BuildConfig,
    BuildHandler,
    JobRunner,
    UnaliasHandler,
)
from mlflow_dock.imaging.smokepolicy import NoSmokeTest, SmokeTest
from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.mlflow.client import ModelPackage, ModelVersionInfo
from mlflow_dock.oci.manifest import OCI_MANIFEST
from mlflow_dock.oci.reference import ImageRef
from support.fakes import REGISTRY, FakeEngine, RotatingCredentials
from support.registry import OciRegistry

MODEL = "fraud-model"
PATH = f"team/{MODEL}"
REPOSITORY = f"{REGISTRY}/{PATH}"
STAGING = f"{REGISTRY}/team/mlflow-dock-staging"


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
class FakeSmoke:
    checked: list[str] = field(default_factory=list)
    fail: bool = False

    def check(self, image: str, example: Path | None, log) -> None:
        self.checked.append(image)
        if self.fail:
            raise PermanentError("smoke test: the container exited before answering /ping")


@dataclass
class FakeWarm:
    prewarmed: list[str] = field(default_factory=list)

    def prewarm(self, runtime: str, image: str, *, repository: str) -> None:
        self.prewarmed.append(image)

    def check(self, runtime, image, model_dir, example, log, *, repository, pull) -> None:  # type: ignore[no-untyped-def]
        pull()


@dataclass
class FakeHistory:
    builds: dict[tuple[str, str], Job] = field(default_factory=dict)
    previous: Job | None = None

    def latest_image(self, model_name: str, *, repository: str, exclude_version: str) -> Job | None:
        return self.previous

    def build_for(self, model_name: str, version: str) -> Job | None:
        return self.builds.get((model_name, version))

    runtimes: dict[tuple[str, str], str] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # repository -> model name

    def repository_owner(self, repository: str, *, other_than: str) -> str | None:
        owner = self.owners.get(repository)
        return owner if owner != other_than else None

    def runtime_image(self, key: str, repository: str) -> str | None:
        return self.runtimes.get((key, repository))

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None:
        self.runtimes[(key, repository)] = digest


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


@dataclass
class Parts:
    runner: JobRunner
    engine: FakeEngine
    smoke: FakeSmoke
    registry: OciRegistry
    history: FakeHistory
    locks: RecordingLocks
    log: list[str]

    def tagged(self, tag: str) -> str | None:
        """The digest ``tag`` names in the model's repository."""
        return self.registry.tags.get((PATH, tag))

    def image(self, name: str = "image") -> str:
        """Store a (layerless) image in the model's repository; its digest."""
        return self.registry.put_manifest(
            PATH, f'{{"schemaVersion":2,"layers":[],"n":"{name}"}}'.encode(), OCI_MANIFEST
        )


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return make_parts(tmp_path)


class FakeAttacher:
    """Records what is attached (and whether the version tag existed yet); the real thing is
    tests/supply/test_attach.py."""

    def __init__(self, registry: OciRegistry) -> None:
        self.registry = registry
        self.calls: list[dict[str, object]] = []

    def attach(self, target, outcome, log, **facts):  # type: ignore[no-untyped-def]
        tag_then = self.registry.tags.get((PATH, facts["model_version"]))
        self.calls.append(
            {"image": outcome.image, "digest": outcome.digest, "tag_then": tag_then, **facts}
        )
        return dataclasses.replace(outcome, sbom=f"{target.repository}@sha256:{'5' * 64}")


class FakeCompanions:
    """Records what the Modelcar is written for, and what was tested and tagged by then; the
    real thing is tests/imaging/test_modelcar.py."""

    def __init__(self, registry: OciRegistry, smoke: FakeSmoke) -> None:
        self.registry = registry
        self.smoke = smoke
        self.calls: list[dict[str, object]] = []

    def publish(self, request, image, *, speaks_v2):  # type: ignore[no-untyped-def]
        digest = image if isinstance(image, str) else image.digest
        self.calls.append(
            {
                "digest": digest,
                "tag_then": self.registry.tags.get((PATH, request.tag)),
                "tested_then": list(self.smoke.checked),
                "env": dict(request.env),
                "speaks_v2": speaks_v2,
            }
        )
        return Companions(v2_model=MODEL, modelcar=f"{REPOSITORY}@sha256:{'c' * 64}")


def make_parts(
    tmp_path: Path,
    *,
    credentials=None,
    smoke: bool = True,
    attach: bool = False,
    delete_tags: bool = True,
    companions: bool = False,
) -> Parts:
    registry = OciRegistry(REGISTRY, verify_references=False, delete_tags=delete_tags)
    engine, fake_smoke, history = FakeEngine(registry), FakeSmoke(), FakeHistory()
    attacher = FakeAttacher(registry) if attach else None
    follower = FakeCompanions(registry, fake_smoke) if companions else None
    locks = RecordingLocks(history)
    transfers = EngineTransfers(
        engine,  # type: ignore[arg-type]
        credentials or StaticCredentials(username="u", password="p"),
    )
    factory = registry.client
    policy = (
        SmokeTest(
            full=fake_smoke,  # type: ignore[arg-type]
            warm=FakeWarm(),  # type: ignore[arg-type]
            engine=transfers,
            untested_without_engine=False,
        )
        if smoke
        else NoSmokeTest()
    )

    publisher = Publisher(registry_factory=factory, engine=transfers, staging=ImageRef(STAGING))

    def pipeline(builder):  # type: ignore[no-untyped-def]
        return Pipeline(
            builder, smoke=policy, publisher=publisher, attacher=attacher, companions=follower
        )

    config = BuildConfig(work_dir=tmp_path / "work", registry=REGISTRY, namespace="team")
    producer = Fallback(
        pipeline(AssembleOnEarlier(previous_version(history), registry_factory=factory)),
        OncePerRuntime(
            assemble=pipeline(
                AssembleOnEarlier(remembered_runtime(history), registry_factory=factory)
            ),
            build=pipeline(LayeredBuilder(engine, timeout_seconds=1800)),  # type: ignore[arg-type]
            memory=history,
            locks=locks,
        ),
    )
    runner = JobRunner(
        build=BuildHandler(
            config=config,
            source=FakeSource(),  # type: ignore[arg-type]
            registry_factory=factory,
            producer=producer,
            builder_name="layered",
            attacher=attacher,
            companions=follower,
            owners=history,
        ),
        alias=AliasHandler(config=config, builds=history, registry_factory=factory),
        unalias=UnaliasHandler(config=config, registry_factory=factory),
    )
    return Parts(runner, engine, fake_smoke, registry, history, locks, [])


def build_job(version: str = "1") -> Job:
    return Job(
        id=f"job-{version}",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version=version,
        state=JobState.RUNNING,
        attempts=1,
    )


def test_first_version_builds_runtime_then_version_smoke_tests_then_publishes(
    parts: Parts,
) -> None:
    outcome = parts.runner.run(build_job("1"), parts.log.append)

    (runtime_tag, runtime_labels, _), (version_ref, _, dockerfile) = parts.engine.builds
    assert runtime_tag.startswith("mlflow-dock-runtime:")
    assert RUNTIME_KEY_LABEL in runtime_labels
    assert version_ref == f"{REPOSITORY}:1"
    assert dockerfile.startswith(f"FROM {runtime_tag}")
    # Smoke-tested under the local name before anything leaves the engine; the engine pushes
    # only to the service's staging repository, never to a tag users see.
    assert parts.smoke.checked == [f"{REPOSITORY}:1"]
    ((pushed_to, _),) = parts.engine.pushes
    assert pushed_to == STAGING
    assert (outcome.image, outcome.tags) == (f"{REPOSITORY}:1", (f"{REPOSITORY}:1",))
    assert outcome.digest == parts.tagged("1") and parts.registry.manifest(PATH, outcome.digest)
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
    assert parts.engine.pushes == [] and parts.tagged("1") is None


def test_previous_image_missing_from_registry_falls_back_to_the_engine(parts: Parts) -> None:
    parts.history.previous = Job(
        id="old",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version="1",
        state=JobState.SUCCEEDED,
        digest="sha256:" + "2" * 64,
    )
    outcome = parts.runner.run(build_job("2"), parts.log.append)
    assert any("registry assembly not possible" in line for line in parts.log)
    assert len(parts.engine.pushes) == 1 and outcome.digest == parts.tagged("2")


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
    assert credentials.invalidated == 1 and len(parts.engine.pushes) == 1
    assert parts.tagged("1") is not None


def test_a_refused_push_with_a_static_password_is_not_retried(tmp_path: Path) -> None:
    parts = make_parts(tmp_path, smoke=False)
    parts.engine.push_errors.append(PermanentError("denied"))
    with pytest.raises(PermanentError, match="denied"):
        parts.runner.run(build_job("1"), parts.log.append)


def runner_with(tmp_path: Path, text: str, **config: object) -> Parts:
    parts = make_parts(tmp_path, smoke=False)
    handler = parts.runner.builds
    handler._source = FakeSource(text)  # type: ignore[assignment]
    handler._config = dataclasses.replace(handler._config, **config)  # type: ignore[arg-type]
    return parts


def test_requirements_the_policy_refuses_fail_before_anything_is_built(tmp_path: Path) -> None:
    parts = runner_with(tmp_path, "numpy==2.4.6\n-r /etc/passwd\n")
    with pytest.raises(RequirementRefused, match=r"^requirements.txt line 2: '-r /etc/passwd'"):
        parts.runner.run(build_job("1"), parts.log.append)
    assert parts.engine.builds == [] and parts.engine.pushes == []


def test_the_operators_opt_ins_reach_the_build(tmp_path: Path) -> None:
    line = "pkg @ git+https://example.com/pkg.git@v1"
    policy = RequirementsPolicy(allow_direct_references=True, allow_sdists=True)
    parts = runner_with(tmp_path, f"{line}\n", requirements=policy)
    parts.runner.run(build_job("1"), parts.log.append)
    runtime = parts.engine.builds[0]
    assert "--only-binary" not in runtime[2]
    strict = runner_with(tmp_path / "strict", "numpy==2.4.6\n")
    strict.runner.run(build_job("1"), strict.log.append)
    assert "--only-binary :all:" in strict.engine.builds[0][2]


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
    recorded = parts.image("version 1")
    parts.registry.tags[(PATH, "1")] = parts.image("moved since")  # the store is what counts
    parts.history.builds[(MODEL, "1")] = Job(
        id="b",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version="1",
        state=JobState.SUCCEEDED,
        digest=recorded,
    )
    outcome = parts.runner.run(alias_job(), parts.log.append)
    assert parts.tagged("champion") == recorded
    assert outcome.image == f"{REPOSITORY}:champion" and outcome.digest == recorded


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
    assert parts.tagged("champion") is None


def test_unalias_of_a_missing_tag_is_a_success_with_a_note(parts: Parts) -> None:
    outcome = parts.runner.run(alias_job(JobKind.UNALIAS), parts.log.append)
    assert outcome.note == "tag did not exist"


def test_unalias_removes_the_tag(parts: Parts) -> None:
    digest = parts.registry.tags[(PATH, "champion")] = parts.image()
    outcome = parts.runner.run(alias_job(JobKind.UNALIAS), parts.log.append)
    assert parts.tagged("champion") is None and outcome.digest == digest


def test_unalias_where_the_registry_cannot_delete_tags_leaves_it_and_says_why(
    tmp_path: Path,
) -> None:
    parts = make_parts(tmp_path, delete_tags=False)
    digest = parts.registry.tags[(PATH, "champion")] = parts.image()
    outcome = parts.runner.run(alias_job(JobKind.UNALIAS), parts.log.append)
    assert outcome.digest == digest
    assert outcome.note is not None and "left in place" in outcome.note
    assert parts.tagged("champion") == digest


def attached_parts(tmp_path: Path) -> tuple[Parts, FakeAttacher]:
    parts = make_parts(tmp_path, attach=True)
    pipeline_attacher = parts.runner.builds._attacher
    assert isinstance(pipeline_attacher, FakeAttacher)
    return parts, pipeline_attacher


def test_a_version_is_attached_to_before_its_tag_names_it(tmp_path: Path) -> None:
    parts, attacher = attached_parts(tmp_path)
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    (call,) = attacher.calls
    # What is signed is what was checked: attached by digest while no tag named it yet.
    assert call["digest"] == outcome.digest and call["tag_then"] is None
    assert call["image"] == f"{REPOSITORY}@{outcome.digest}"
    assert call["model_version"] == "1" and call["run_id"] == "run-1"
    assert call["model_source"] == "models:/m-1"
    assert call["job_id"] == "job-1" and call["builder"] == "layered"
    assert outcome.sbom == f"{REPOSITORY}@sha256:{'5' * 64}"


def test_an_adopted_version_is_attached_again(tmp_path: Path) -> None:
    # A re-run after a lost lease adopts the published tag; a version published by an earlier
    # release (which attached after tagging) may have died between the two.
    parts, attacher = attached_parts(tmp_path)
    digest = parts.registry.tags[(PATH, "1")] = parts.image()
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert parts.engine.builds == []
    assert [c["digest"] for c in attacher.calls] == [digest]
    assert outcome.sbom is not None


def test_a_version_tag_already_in_the_registry_is_adopted_not_moved(parts: Parts) -> None:
    # A job re-run after a lost lease: its first run published before it lost the store.
    digest = parts.registry.tags[(PATH, "1")] = parts.image()
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert parts.engine.builds == [] and parts.engine.pushes == []
    assert (outcome.image, outcome.digest) == (f"{REPOSITORY}:1", digest)


def test_the_runtime_build_holds_the_deployment_wide_lock(parts: Parts) -> None:
    locks = parts.locks
    parts.runner.run(build_job("1"), parts.log.append)
    assert locks.events[0] == "locked runtime" and len(locks.events) == 2


def test_a_version_tag_that_appears_during_the_build_is_kept_not_moved(tmp_path: Path) -> None:
    """Checked right before the tag is written: another run (whose lease this one took over
    while it was only paused) published while this one was building."""
    parts, attacher = attached_parts(tmp_path)
    other = parts.image("the other run's")
    build = parts.engine.build

    def build_then_other_run_publishes(context, **kwargs) -> None:
        build(context, **kwargs)
        if kwargs["tag"] == f"{REPOSITORY}:1":
            parts.registry.tags[(PATH, "1")] = other

    parts.engine.build = build_then_other_run_publishes  # type: ignore[method-assign]
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert parts.tagged("1") == other
    assert outcome.digest == other and outcome.note is not None
    assert "never move" in outcome.note
    # The kept image is the outcome, and its attachments are its own.
    assert attacher.calls[-1]["digest"] == other


def test_a_new_runtime_is_remembered_before_its_lock_is_let_go(parts: Parts) -> None:
    locks = parts.locks
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert locks.events == ["locked runtime", "released, runtime known: True"]
    assert list(parts.history.runtimes.values()) == [outcome.digest]
    assert [key[1] for key in parts.history.runtimes] == [REPOSITORY]


def test_a_runtime_another_build_published_is_assembled_on_not_built_again(
    parts: Parts,
) -> None:
    """A version that waited for (or came after) the build of its runtime assembles on that
    image; only when that is impossible does it build, under the lock again."""
    locks = parts.locks
    parts.runner.run(build_job("1"), parts.log.append)
    assert len(locks.events) == 2
    parts.log.clear()
    # Version 1's job has not recorded its outcome (history.previous is None), but its
    # runtime image is known: version 2 tries to assemble on it first.
    parts.runner.run(build_job("2"), parts.log.append)
    assert any("registry assembly not possible" in line for line in parts.log), parts.log
    assert len(locks.events) == 4  # a layerless fake image cannot be assembled on: built again


def test_a_registry_that_does_not_mount_gets_the_staged_blobs_copied_through(
    tmp_path: Path,
) -> None:
    parts = make_parts(tmp_path, smoke=False)
    parts.registry.mount = False
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    config = parts.registry.doc(PATH, outcome.digest)["config"]["digest"]
    staging = STAGING.split("/", 1)[1]
    assert parts.registry.blobs[(PATH, config)] == parts.registry.blobs[(staging, config)]
    assert config in parts.registry.reads("blob")


def test_a_repository_another_model_published_to_is_refused_without_naming_it(
    parts: Parts,
) -> None:
    # Sanitised names end in a 40-bit hash: a name crafted to collide with another team's.
    parts.history.owners[REPOSITORY] = "Another Team's Model"
    with pytest.raises(PermanentError, match="already holds images of another model") as info:
        parts.runner.run(build_job("1"), parts.log.append)
    assert "Another Team" not in str(info.value)
    assert parts.engine.builds == [] and parts.tagged("1") is None


def companion_parts(tmp_path: Path) -> tuple[Parts, FakeCompanions]:
    parts = make_parts(tmp_path, companions=True)
    follower = parts.runner.builds._companions
    assert isinstance(follower, FakeCompanions)
    return parts, follower


def test_the_modelcar_is_written_after_the_smoke_test_and_before_the_version_tag(
    tmp_path: Path,
) -> None:
    parts, follower = companion_parts(tmp_path)
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    (call,) = follower.calls
    assert call["digest"] == outcome.digest and call["tag_then"] is None
    assert call["tested_then"] == [f"{REPOSITORY}:1"]
    assert call["speaks_v2"] is True  # the layered engine build runs mlflow-dock's server
    assert (outcome.modelcar, outcome.v2_model) == (f"{REPOSITORY}@sha256:{'c' * 64}", MODEL)
    # The version's V2 name and version reach the build (the engine's model Dockerfile).
    assert call["env"] == {"MLFLOW_DOCK_V2_MODEL_NAME": MODEL, "MLFLOW_DOCK_V2_MODEL_VERSION": "1"}
    dockerfile = parts.engine.builds[-1][2]
    assert 'ENV MLFLOW_DOCK_V2_MODEL_NAME="fraud-model"' in dockerfile


def test_a_model_that_failed_its_smoke_test_gets_no_modelcar(tmp_path: Path) -> None:
    parts, follower = companion_parts(tmp_path)
    parts.smoke.fail = True
    with pytest.raises(PermanentError):
        parts.runner.run(build_job("1"), parts.log.append)
    assert follower.calls == []


def test_an_adopted_version_gets_its_modelcar(tmp_path: Path) -> None:
    # Published by a release before Modelcars (or by this job's first run, lease lost).
    parts, follower = companion_parts(tmp_path)
    digest = parts.registry.tags[(PATH, "1")] = parts.image()
    outcome = parts.runner.run(build_job("1"), parts.log.append)
    assert [c["digest"] for c in follower.calls] == [digest]
    assert follower.calls[0]["speaks_v2"] is None  # whatever made it: read from the image
    assert outcome.modelcar is not None and outcome.digest == digest


def recorded_build(parts: Parts, *, modelcar: str | None) -> str:
    recorded = parts.image("version 1")
    parts.history.builds[(MODEL, "1")] = Job(
        id="b",
        kind=JobKind.BUILD,
        model_name=MODEL,
        version="1",
        state=JobState.SUCCEEDED,
        digest=recorded,
        modelcar=modelcar,
        v2_model=MODEL,
    )
    return recorded


def test_an_alias_moves_the_modelcar_tag_with_the_image_tag(parts: Parts) -> None:
    car = parts.image("modelcar of version 1")
    recorded_build(parts, modelcar=f"{REPOSITORY}@{car}")
    outcome = parts.runner.run(alias_job(), parts.log.append)
    assert parts.tagged("champion-modelcar") == car
    assert (outcome.modelcar, outcome.v2_model) == (f"{REPOSITORY}@{car}", MODEL)
    # An alias that would end like a Modelcar tag is hashed: the two never collide.
    parts.runner.run(alias_job(alias="x-modelcar"), parts.log.append)
    assert parts.tagged("x-modelcar") is None


def test_an_alias_of_a_version_without_modelcar_tags_the_image_only(parts: Parts) -> None:
    recorded_build(parts, modelcar=None)
    outcome = parts.runner.run(alias_job(), parts.log.append)
    assert parts.tagged("champion-modelcar") is None and outcome.modelcar is None


def test_unalias_removes_the_modelcar_tag_too(parts: Parts) -> None:
    parts.registry.tags[(PATH, "champion")] = parts.image()
    parts.registry.tags[(PATH, "champion-modelcar")] = parts.image("car")
    parts.runner.run(alias_job(JobKind.UNALIAS), parts.log.append)
    assert parts.tagged("champion") is None and parts.tagged("champion-modelcar") is None
