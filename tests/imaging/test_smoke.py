"""Unit tests for mlflow_dock.imaging.smoke with a fake engine whose "container" is a local server.

Real containers are the integration tests' job (test_confinement, test_end_to_end); here the
SmokeTester's own rules are pinned down: the confinement every container gets, what passes, what
fails with which reason, that the container is always removed, and whose leftovers a starting
service may remove. The in-container probe is the real one, run here as a local process against
the fake container's server (its port 8080 and /opt/ml/model are mapped onto the fake's).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.imaging import smoke
from mlflow_dock.imaging.dockerfile import MODEL_DIR, SERVING_PORT
from mlflow_dock.imaging.smoke import (
    OWNER_LABEL,
    SMOKE_LABEL,
    SmokeLimits,
    SmokeTester,
    confinement,
    engine_cpus,
    owner_of,
)


@dataclass
class FakeContainer:
    """Serves /ping and /invocations like a serving image, until it 'exits'."""

    options: dict[str, Any]
    model_dir: Path
    ping_status: int = 200
    invocations_status: int = 200
    exits: bool = False
    oom: bool = False
    # OOM-killed while the probe runs; the engine reports the exit only after this many reloads.
    killed_during_probe: bool = False
    reloads_until_exit: int = 0
    # The probe dies and the container runs on; with ``oom_event`` the kernel killed it for the
    # container's memory, OOMKilled stays false and only the engine's 'oom' event tells.
    probe_dies: bool = False
    oom_event: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "running"
    removed: dict[str, Any] | None = None
    posted: list[bytes] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.options.get("labels", {}))

    @property
    def attrs(self) -> dict[str, Any]:
        return {"State": {"OOMKilled": self.oom}}

    def start(self) -> None:
        if self.exits or self.oom:
            self.status = "exited"
            return
        container = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(container.ping_status)
                self.end_headers()

            def do_POST(self) -> None:
                container.posted.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(container.invocations_status)
                self.end_headers()
                self.wfile.write(json.dumps({"predictions": [1]}).encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reload(self) -> None:
        if self.reloads_until_exit > 0:
            self.reloads_until_exit -= 1
            if self.reloads_until_exit == 0:
                self.status = "exited"

    def logs(self, tail: int = 15) -> bytes:
        return b"Traceback (most recent call last):\nRuntimeError: deliberately broken\n"

    def remove(self, **kwargs: Any) -> None:
        self.removed = kwargs
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class FakeApi:
    """The engine's exec API: runs the command as a local process 'inside' the container."""

    def __init__(self, containers: FakeContainers) -> None:
        self._containers = containers
        self._execs: dict[str, tuple[FakeContainer, list[str]]] = {}
        self._codes: dict[str, int] = {}

    def exec_create(self, container_id: str, cmd: list[str]) -> dict[str, str]:
        container = next(c for c in self._containers.started if c.id == container_id)
        if container.status != "running":
            raise RuntimeError(f"Container {container_id} is not running")
        exec_id = uuid.uuid4().hex
        self._execs[exec_id] = (container, cmd)
        return {"Id": exec_id}

    def exec_start(self, exec_id: str, stream: bool) -> Iterator[bytes]:
        container, cmd = self._execs[exec_id]
        if container.probe_dies:
            self._codes[exec_id] = 137
            yield b""
            return
        if container.killed_during_probe:
            container.oom, container.reloads_until_exit = True, 3
            self._codes[exec_id] = 137
            yield b""
            return
        assert container.server is not None and cmd[:4] == ["python", "-I", "-S", "-c"]
        port = str(container.server.server_address[1])
        args = [a.replace(MODEL_DIR, str(container.model_dir)) for a in cmd[5:]]
        assert args[0] == str(SERVING_PORT)
        proc = subprocess.run(
            [sys.executable, *cmd[1:5], port, *args[1:]], capture_output=True, timeout=60
        )
        self._codes[exec_id] = proc.returncode
        yield proc.stdout

    def exec_inspect(self, exec_id: str) -> dict[str, int]:
        return {"ExitCode": self._codes[exec_id]}


@dataclass
class FakeContainers:
    model_dir: Path
    behaviour: dict[str, Any] = field(default_factory=dict)
    started: list[FakeContainer] = field(default_factory=list)
    existing: list[FakeContainer] = field(default_factory=list)

    def run(self, image: str, **options: Any) -> FakeContainer:
        container = FakeContainer(options, self.model_dir, **self.behaviour)
        container.start()
        self.started.append(container)
        return container

    def list(self, all: bool, filters: dict[str, str]) -> list[FakeContainer]:
        assert filters == {"label": SMOKE_LABEL}
        return self.existing


class FakeEngine:
    def __init__(self, containers: FakeContainers) -> None:
        self.client = type("Client", (), {"containers": containers, "api": None})()
        self.client.api = FakeApi(containers)

        def events(
            since: int, until: int, filters: dict[str, str], decode: bool
        ) -> Iterator[dict[str, Any]]:
            assert filters["event"] == "oom" and decode and since < until
            for container in containers.started:
                if container.id == filters["container"] and container.oom_event:
                    yield {"Action": "oom", "id": container.id}

        self.client.events = events


def make_tester(containers: FakeContainers, timeout: float = 20.0) -> SmokeTester:
    limits = SmokeLimits(memory_bytes=512 * 1024**2, cpus=0.5, pids=64, timeout_seconds=timeout)
    return SmokeTester(FakeEngine(containers), limits=limits)  # type: ignore[arg-type]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "serving_input_example.json").write_text('{"inputs": [[1, 2, 3, 4]]}')
    return model


@pytest.fixture
def example(model_dir: Path) -> Path:
    return model_dir / "serving_input_example.json"


def test_a_serving_image_passes_confined_and_its_container_is_removed(
    model_dir: Path, example: Path
) -> None:
    containers = FakeContainers(model_dir)
    log: list[str] = []
    make_tester(containers).check("reg/m@sha256:x", example, log.append)
    assert log[-1].startswith("smoke test passed")
    (container,) = containers.started
    # The image's own copy of the example was posted (nothing enters the container).
    assert container.posted == [example.read_bytes()]
    assert container.removed == {"force": True, "v": True}
    options = container.options
    assert options["network_mode"] == "none"
    assert options["mem_limit"] == options["memswap_limit"] == 512 * 1024**2
    assert options["nano_cpus"] == 500_000_000 and options["pids_limit"] == 64
    assert options["cap_drop"] == ["ALL"] and options["security_opt"] == ["no-new-privileges"]
    assert options["user"] == "10001:10001" and options["read_only"] is True
    assert set(options["tmpfs"]) == {"/tmp", "/var/log/nginx", "/var/lib/nginx"}
    # None of this process's environment; $HOME is writable; stock MLflow's server starts one
    # worker, not one per CPU.
    assert options["environment"] == {"HOME": "/tmp", "MLFLOW_MODELS_WORKERS": "1"}
    # Labelled so a later start can tell whose container it was.
    assert options["labels"][SMOKE_LABEL] == "1"
    assert options["labels"][OWNER_LABEL] == owner_of(os.getpid())


def test_a_container_that_exits_fails_with_its_last_log_line(
    model_dir: Path, example: Path
) -> None:
    containers = FakeContainers(model_dir, behaviour={"exits": True})
    with pytest.raises(PermanentError, match=r"exited before answering /ping.*deliberately broken"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)
    assert containers.started[0].removed is not None


def test_a_model_killed_for_its_memory_fails_naming_the_limit(
    model_dir: Path, example: Path
) -> None:
    containers = FakeContainers(model_dir, behaviour={"oom": True})
    with pytest.raises(PermanentError, match=r"memory limit \(512 MiB, MLFLOW_DOCK_SMOKE_MEMORY\)"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)
    assert containers.started[0].removed is not None


def test_a_model_killed_while_probed_fails_once_the_engine_reports_the_exit(
    model_dir: Path, example: Path
) -> None:
    """The probe's stream ends before the engine marks the container exited: not a retry."""
    containers = FakeContainers(model_dir, behaviour={"killed_during_probe": True})
    with pytest.raises(PermanentError, match=r"memory limit \(512 MiB, MLFLOW_DOCK_SMOKE_MEMORY\)"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)


def test_a_probe_killed_for_the_containers_memory_fails_naming_the_limit(
    model_dir: Path, example: Path
) -> None:
    """The container runs on (its main process was spared): the engine's 'oom' event decides."""
    containers = FakeContainers(model_dir, behaviour={"probe_dies": True, "oom_event": True})
    with pytest.raises(PermanentError, match=r"memory limit \(512 MiB, MLFLOW_DOCK_SMOKE_MEMORY\)"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)
    assert containers.started[0].status == "running"
    assert containers.started[0].removed is not None


def test_a_probe_that_dies_for_no_reported_reason_is_retried(
    model_dir: Path, example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither an exit nor an 'oom' event within the grace: nothing says the model is at fault."""
    monkeypatch.setattr(smoke, "EXIT_GRACE_SECONDS", 0.5)
    containers = FakeContainers(model_dir, behaviour={"probe_dies": True})
    with pytest.raises(RetryableError, match="the probe gave no answer"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)


def test_a_wrong_answer_to_the_input_example_fails(model_dir: Path, example: Path) -> None:
    containers = FakeContainers(model_dir, behaviour={"invocations_status": 400})
    with pytest.raises(PermanentError, match=r"/invocations .* answered 400"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)
    assert containers.started[0].removed is not None


def test_no_ping_within_the_deadline_fails_with_the_log_tail(
    model_dir: Path, example: Path
) -> None:
    containers = FakeContainers(model_dir, behaviour={"ping_status": 503})
    started = time.monotonic()
    with pytest.raises(
        PermanentError, match=r"no answer on /ping within 1 s .*deliberately broken"
    ):
        make_tester(containers, timeout=1.0).check("reg/m:1", example, lambda _line: None)
    # One deadline for the whole test, enforced inside the container.
    assert time.monotonic() - started < 10
    assert containers.started[0].removed is not None


def test_without_an_input_example_only_ping_is_checked(model_dir: Path) -> None:
    containers = FakeContainers(model_dir, behaviour={"invocations_status": 500})
    make_tester(containers).check("reg/m:1", None, lambda _line: None)
    assert containers.started[0].posted == []


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_only_a_dead_owners_leftovers_are_removed(model_dir: Path) -> None:
    host = socket.gethostname()

    def labelled(owner: str | None) -> FakeContainer:
        labels = {SMOKE_LABEL: "1"} | ({OWNER_LABEL: owner} if owner else {})
        return FakeContainer({"labels": labels}, model_dir)

    dead_pid = _dead_pid()
    dead = labelled(owner_of(dead_pid))
    alive = labelled(owner_of(os.getpid()))
    elsewhere = labelled("other-machine:4026531836:1")
    # A service in a container on the host's network: the host's name, its own PIDs. A PID
    # that is dead here may be a live process there.
    other_namespace = labelled(f"{host}:1:{dead_pid}")
    # Labels written before the namespace was part of them say too little to tell.
    legacy = labelled(f"{host}:{dead_pid}")
    unlabelled = labelled(None)
    spared = [alive, elsewhere, other_namespace, legacy, unlabelled]
    containers = FakeContainers(model_dir, existing=[dead, *spared])
    assert make_tester(containers).remove_leftovers() == 1
    # With its anonymous volume (a warm container's checks).
    assert dead.removed == {"force": True, "v": True}
    assert [c.removed for c in spared] == [None] * len(spared)


def test_the_cpu_limit_is_lowered_to_the_cpus_the_engine_has() -> None:
    """Docker refuses a container that asks for more CPUs than the machine has."""
    assert confinement(SmokeLimits(cpus=8), cpus_available=2)["nano_cpus"] == 2_000_000_000
    assert confinement(SmokeLimits(cpus=0.5), cpus_available=2)["nano_cpus"] == 500_000_000
    assert confinement(SmokeLimits(cpus=8))["nano_cpus"] == 8_000_000_000
    assert SmokeLimits().cpus == 2  # the default (MLFLOW_DOCK_SMOKE_CPUS)

    class Engine:
        def info(self) -> dict[str, int]:
            return {"NCPU": 4}

    class Silent:
        def info(self) -> dict[str, int]:
            raise ConnectionError("engine went away")

    assert engine_cpus(Engine()) == 4
    assert engine_cpus(Silent()) is None
