"""Unit tests for mlflow_dock.imaging.warm: which container a check runs in, how it is confined,
and what a failed check says. The loader itself (MLflow inside a real image) is exercised by
tests/integration/test_warm_smoke.py and test_confinement.py; here the engine is a fake whose
exec answers what a loader would."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.imaging.smoke import SmokeLimits
from mlflow_dock.imaging.warm import WARM_LABEL, WarmSmoke


@dataclass
class FakeWarmContainer:
    image: str
    options: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "running"
    removed: dict[str, Any] | None = None
    archives: list[tuple[str, bytes]] = field(default_factory=list)

    def reload(self) -> None:
        pass

    def logs(self, tail: int = 5) -> bytes:
        return b"warm: ready\n"

    def put_archive(self, path: str, data: IO[bytes]) -> bool:
        self.archives.append((path, data.read()))
        return True

    def remove(self, **kwargs: Any) -> None:
        self.removed = kwargs


@dataclass
class FakeClient:
    answer: dict[str, Any] = field(default_factory=lambda: {"ok": True, "detail": "loaded"})
    started: list[FakeWarmContainer] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)

    @property
    def containers(self) -> FakeClient:
        return self

    @property
    def api(self) -> FakeClient:
        return self

    def run(self, image: str, **options: Any) -> FakeWarmContainer:
        container = FakeWarmContainer(image, options)
        self.started.append(container)
        return container

    def exec_create(self, container_id: str, cmd: list[str]) -> dict[str, str]:
        self.commands.append(cmd)
        return {"Id": "exec"}

    def exec_start(self, exec_id: str, stream: bool) -> Iterator[bytes]:
        yield b".\n"  # a heartbeat while the loader works
        yield json.dumps(self.answer).encode() + b"\n"

    def exec_inspect(self, exec_id: str) -> dict[str, int]:
        return {"ExitCode": 0}


LIMITS = SmokeLimits(memory_bytes=512 * 1024**2, cpus=1.0, pids=128, timeout_seconds=30)


def make_warm(client: FakeClient, **kwargs: Any) -> WarmSmoke:
    engine = type("Engine", (), {"client": client})()
    return WarmSmoke(engine, limits=LIMITS, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "serving_input_example.json").write_text("{}")
    return model


def check(warm: WarmSmoke, model_dir: Path, *, repository: str, log: list[str]) -> None:
    warm.check(
        "runtime-key",
        f"{repository}@sha256:1",
        model_dir,
        model_dir / "serving_input_example.json",
        log.append,
        repository=repository,
    )


def test_versions_of_one_model_share_a_warm_container_that_is_confined(model_dir: Path) -> None:
    client = FakeClient()
    log: list[str] = []
    warm = make_warm(client)
    check(warm, model_dir, repository="reg/team-a/model", log=log)
    check(warm, model_dir, repository="reg/team-a/model", log=log)
    (container,) = client.started
    assert log[-1].startswith("smoke test passed in a warm runtime")
    options = container.options
    assert options["network_mode"] == "none" and options["read_only"] is True
    assert options["cap_drop"] == ["ALL"] and options["user"] == "10001:10001"
    assert options["mem_limit"] == 512 * 1024**2 and options["pids_limit"] == 128
    assert options["labels"][WARM_LABEL] == "1"
    # Artifacts go into an anonymous volume (the root filesystem is read-only).
    assert options["mounts"][0]["Type"] == "volume" and not options["mounts"][0]["Source"]
    path, data = container.archives[0]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert all(tar.getmember(n).uid == 10001 for n in names if n != "checks")
    assert path == options["mounts"][0]["Target"]
    assert any(n.endswith("/serving_input_example.json") for n in names)
    warm.close()
    assert container.removed == {"force": True, "v": True}


def test_two_models_with_the_same_runtime_never_share_a_container(model_dir: Path) -> None:
    client = FakeClient()
    warm = make_warm(client)
    check(warm, model_dir, repository="reg/team-a/model", log=[])
    check(warm, model_dir, repository="reg/team-b/model", log=[])
    assert [c.image for c in client.started] == [
        "reg/team-a/model@sha256:1",
        "reg/team-b/model@sha256:1",
    ]


def test_the_least_recently_used_container_goes_beyond_the_cap(model_dir: Path) -> None:
    client = FakeClient()
    warm = make_warm(client, max_containers=2)
    for name in ("a", "b", "a", "c"):
        check(warm, model_dir, repository=f"reg/{name}", log=[])
    first, second, third = client.started
    assert second.removed is not None  # b was used least recently
    assert first.removed is None and third.removed is None


def test_a_check_killed_for_its_memory_names_the_limit(model_dir: Path) -> None:
    client = FakeClient(answer={"ok": False, "killed": True, "detail": "killed (SIGKILL)"})
    with pytest.raises(PermanentError, match=r"memory limit \(512 MiB, MLFLOW_DOCK_SMOKE_MEMORY\)"):
        check(make_warm(client), model_dir, repository="reg/m", log=[])


def test_a_check_past_the_deadline_names_the_setting(model_dir: Path) -> None:
    client = FakeClient(answer={"ok": False, "timeout": True, "detail": "no answer within 30 s"})
    with pytest.raises(PermanentError, match=r"no answer within 30 s .*TIMEOUT_SECONDS"):
        check(make_warm(client), model_dir, repository="reg/m", log=[])
    # The deadline reaches the loader, which kills the check.
    assert float(client.commands[-1][-1]) <= 30


def test_no_answer_from_the_loader_discards_the_container(model_dir: Path) -> None:
    client = FakeClient(answer={})
    warm = make_warm(client)
    with pytest.raises(RetryableError, match="no answer from the warm runtime"):
        check(warm, model_dir, repository="reg/m", log=[])
    assert client.started[0].removed is not None


def test_big_files_the_container_holds_are_linked_and_others_stored_once(tmp_path: Path) -> None:
    """Version 1's image holds weights A; version 2 brings B (stored once, read-only, root's);
    version 3 keeps B (nothing copied); version 4 is back to A (the image's copy), so the
    stored B, which no check refers to any more, is removed."""
    model = tmp_path / "model"
    (model / "artifacts").mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    weights = model / "artifacts" / "weights.bin"
    client = FakeClient()
    removed: list[list[str]] = []
    warm = make_warm(client)
    log: list[str] = []

    def version(content: bytes, digest: str, image_files: dict[str, str]) -> tarfile.TarFile:
        weights.write_bytes(content)
        warm.check(
            "runtime-key",
            "reg/team/model@sha256:1",
            model,
            None,
            log.append,
            repository="reg/team/model",
            files={"artifacts/weights.bin": digest},
            image_files=image_files,
        )
        container = client.started[0]
        container.exec_run = lambda cmd, user: removed.append([*cmd[3:], user])  # type: ignore[attr-defined]
        return tarfile.open(fileobj=io.BytesIO(container.archives[-1][1]))

    first = version(b"B" * 100, "sha256:bbbb", {"artifacts/weights.bin": "sha256:aaaa"})
    stored = first.getmember("files/sha256-bbbb")
    assert (stored.uid, stored.mode, first.extractfile(stored).read()) == (0, 0o444, b"B" * 100)  # type: ignore[union-attr]
    assert first.getmember("files").uid == 0 and first.getmember("files").mode == 0o755
    (link,) = [m for m in first.getmembers() if m.name.endswith("/artifacts/weights.bin")]
    assert link.issym() and link.linkname == "/mlflow-dock-checks/files/sha256-bbbb"

    second = version(b"B" * 100, "sha256:bbbb", {})
    assert [m.name for m in second.getmembers() if m.isfile()] == [
        n for n in second.getnames() if n.endswith("/MLmodel")
    ]
    assert "1 of 1 big model file(s) not copied" in "\n".join(log)

    third = version(b"A" * 100, "sha256:aaaa", {})
    (link,) = [m for m in third.getmembers() if m.name.endswith("/artifacts/weights.bin")]
    assert link.linkname == "/opt/ml/model/artifacts/weights.bin"
    assert not any(m.name.startswith("files") for m in third.getmembers())
    assert removed == [["/mlflow-dock-checks/files/sha256-bbbb", "0"]]
    assert len(client.started) == 1


def test_placement_links_what_the_image_or_the_store_holds_and_copies_content_once() -> None:
    from mlflow_dock.imaging.warm import place_files

    placement = place_files(
        {"a.bin": "sha256:1", "b.bin": "sha256:2", "c.bin": "sha256:2"},
        {"a.bin": "sha256:1"},
        {"sha256:2"},
    )
    assert placement.links == {
        "a.bin": "/opt/ml/model/a.bin",
        "b.bin": "/mlflow-dock-checks/files/sha256-2",
        "c.bin": "/mlflow-dock-checks/files/sha256-2",
    }
    assert placement.to_store == {} and placement.digests == {"sha256:2"}
    fresh = place_files({"b.bin": "sha256:3", "c.bin": "sha256:3"}, {}, set())
    assert fresh.to_store == {"b.bin": "sha256:3"}  # the same content is copied once
