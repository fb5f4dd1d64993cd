"""The smoke test as one policy over any candidate (imaging/smokepolicy.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mlflow_dock.cloud.static import StaticCredentials
from mlflow_dock.imaging.builder import LocalImage, StagedImage
from mlflow_dock.imaging.engine import EngineTransfers
from mlflow_dock.imaging.smokepolicy import UNTESTED_NOTE, SmokeTest
from mlflow_dock.oci.manifest import Manifest
from support.fakes import FakeEngine
from support.fakes import build_request as request

MANIFEST = Manifest.from_bytes(b'{"m":1}', "application/vnd.oci.image.manifest.v1+json")
TESTED = "sha256:" + "7" * 64


@dataclass
class Recorder:
    calls: list[tuple[str, str]] = field(default_factory=list)
    # The warm containers asked for: one per model (its repository), never shared.
    repositories: list[str] = field(default_factory=list)
    # The big model files each warm check or prewarm was told of: (files, image's files).
    files: list[tuple[Any, Any]] = field(default_factory=list)

    def check(self, *args, pull=None, repository=None, files=None, image_files=None) -> None:  # type: ignore[no-untyped-def]
        # SmokeTester.check(image, example, log); WarmSmoke.check(key, image, ..., repository=,
        # pull=, files=, image_files=)
        if pull is not None:
            pull()
            self.calls.append(("warm", args[1]))
            self.repositories.append(repository)
            self.files.append((files, image_files))
        else:
            self.calls.append(("full", args[0]))

    def prewarm(self, runtime: str, image: str, *, repository: str, image_files=None) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("prewarm", image))
        self.repositories.append(repository)
        self.files.append((None, image_files))


class DeadEngine(FakeEngine):
    def ping(self) -> None:
        raise ConnectionError("no engine")


def policy(engine: FakeEngine, recorder: Recorder, *, untested: bool = True) -> SmokeTest:
    transfers = EngineTransfers(engine, StaticCredentials(username="u", password="p"))  # type: ignore[arg-type]
    return SmokeTest(
        full=recorder,  # type: ignore[arg-type]
        warm=recorder,  # type: ignore[arg-type]
        engine=transfers,
        untested_without_engine=untested,
    )


def test_an_engine_free_candidate_without_an_engine_is_published_untested(tmp_path: Path) -> None:
    log: list[str] = []
    recorder = Recorder()
    note = policy(DeadEngine(), recorder).check(StagedImage(MANIFEST), request(tmp_path, log))
    assert note == UNTESTED_NOTE and recorder.calls == [] and log == [UNTESTED_NOTE]


def test_a_staged_image_gets_a_full_run_after_a_pull_then_its_runtime_is_kept_warm(
    tmp_path: Path,
) -> None:
    engine, recorder = FakeEngine(), Recorder()
    assert policy(engine, recorder).check(StagedImage(MANIFEST), request(tmp_path, [])) is None
    staged = f"registry.test/team/m@{MANIFEST.digest}"
    assert engine.pulls == [("registry.test/team/m", MANIFEST.digest)]
    assert recorder.calls == [("full", staged), ("prewarm", staged)]
    assert recorder.repositories == ["registry.test/team/m"]
    assert recorder.files == [(None, {})]


def test_an_image_assembled_on_a_tested_one_is_checked_warm_in_that_image(tmp_path: Path) -> None:
    engine, recorder = FakeEngine(), Recorder()
    candidate = StagedImage(
        MANIFEST,
        tested_on=TESTED,
        model_files={"weights.bin": "sha256:new"},
        tested_on_files={"weights.bin": "sha256:old"},
    )
    policy(engine, recorder).check(candidate, request(tmp_path, []))
    assert recorder.calls == [("warm", f"registry.test/team/m@{TESTED}")]
    # What the warm runtime may hold already, so that it is not copied again.
    assert recorder.files == [({"weights.bin": "sha256:new"}, {"weights.bin": "sha256:old"})]
    assert recorder.repositories == ["registry.test/team/m"]
    assert engine.pulls == [("registry.test/team/m", TESTED)]


@pytest.mark.parametrize("shares_runtime", [True, False])
def test_an_engine_image_is_run_under_its_local_name(tmp_path: Path, shares_runtime: bool) -> None:
    recorder = Recorder()
    candidate = LocalImage("registry.test/team/m:1", shares_runtime=shares_runtime)
    policy(FakeEngine(), recorder, untested=False).check(candidate, request(tmp_path, []))
    expected = [("full", "registry.test/team/m:1")]
    if shares_runtime:
        expected.append(("prewarm", "registry.test/team/m:1"))
    assert recorder.calls == expected
