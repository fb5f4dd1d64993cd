"""Unit tests for mlflow_dock.build.smoke with a fake engine whose "container" is a local server.

Real containers are the integration tests' job (test_image_quality, test_end_to_end); here the
SmokeTester's own rules are pinned down: what passes, what fails with which reason, that the
container is always removed, and whose leftovers a starting service may remove.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mlflow_dock.build.smoke import OWNER_LABEL, SMOKE_LABEL, SmokeTester
from mlflow_dock.errors import PermanentError


@dataclass
class FakeContainer:
    """Serves /ping and /invocations on $PORT like a serving image, until it 'exits'."""

    environment: dict[str, str]
    labels: dict[str, str]
    ping_status: int = 200
    invocations_status: int = 200
    exits: bool = False
    status: str = "running"
    removed: bool = False
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        if self.exits:
            self.status = "exited"
            return
        container = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(container.ping_status)
                self.end_headers()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(container.invocations_status)
                self.end_headers()
                self.wfile.write(json.dumps({"predictions": [1]}).encode())

            def log_message(self, *args: Any) -> None:
                pass

        port = int(self.environment["PORT"])
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reload(self) -> None:
        pass

    def logs(self, tail: int = 15) -> bytes:
        return b"Traceback (most recent call last):\nRuntimeError: deliberately broken\n"

    def remove(self, force: bool = False) -> None:
        self.removed = True
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class FakeContainers:
    behaviour: dict[str, Any] = field(default_factory=dict)
    started: list[FakeContainer] = field(default_factory=list)
    existing: list[FakeContainer] = field(default_factory=list)

    def run(self, image: str, **kwargs: Any) -> FakeContainer:
        container = FakeContainer(kwargs["environment"], kwargs["labels"], **self.behaviour)
        container.start()
        self.started.append(container)
        return container

    def list(self, all: bool, filters: dict[str, str]) -> list[FakeContainer]:
        assert filters == {"label": SMOKE_LABEL}
        return self.existing


class FakeEngine:
    def __init__(self, containers: FakeContainers) -> None:
        self.client = type("Client", (), {"containers": containers})()


def make_tester(containers: FakeContainers, timeout: float = 5.0) -> SmokeTester:
    return SmokeTester(
        FakeEngine(containers),  # type: ignore[arg-type]
        network_mode="host",
        timeout_seconds=timeout,
        sleep=lambda _s: None,
    )


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "serving_input_example.json"
    path.write_text('{"inputs": [[1, 2, 3, 4]]}')
    return path


def test_a_serving_image_passes_and_its_container_is_removed(example: Path) -> None:
    containers = FakeContainers()
    log: list[str] = []
    make_tester(containers).check("reg/m@sha256:x", example, log.append)
    assert log[-1] == "smoke test passed"
    (container,) = containers.started
    assert container.removed
    # Labelled so a later start can tell whose container it was.
    assert container.labels[SMOKE_LABEL] == "1"
    assert container.labels[OWNER_LABEL] == f"{socket.gethostname()}:{os.getpid()}"


def test_a_container_that_exits_fails_with_its_last_log_line(example: Path) -> None:
    containers = FakeContainers(behaviour={"exits": True})
    with pytest.raises(PermanentError, match=r"exited before answering /ping.*deliberately broken"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)
    assert containers.started[0].removed


def test_a_wrong_answer_to_the_input_example_fails(example: Path) -> None:
    containers = FakeContainers(behaviour={"invocations_status": 400})
    with pytest.raises(PermanentError, match=r"/invocations .* answered 400"):
        make_tester(containers).check("reg/m:1", example, lambda _line: None)
    assert containers.started[0].removed


def test_no_ping_within_the_timeout_fails_with_the_log_tail(example: Path) -> None:
    containers = FakeContainers(behaviour={"ping_status": 503})
    with pytest.raises(PermanentError, match="no answer on /ping within 0 s"):
        make_tester(containers, timeout=0.2).check("reg/m:1", example, lambda _line: None)
    assert containers.started[0].removed


def test_without_an_input_example_only_ping_is_checked() -> None:
    containers = FakeContainers(behaviour={"invocations_status": 500})
    make_tester(containers).check("reg/m:1", None, lambda _line: None)


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_only_a_dead_owners_leftovers_are_removed() -> None:
    host = socket.gethostname()
    dead = FakeContainer({}, {SMOKE_LABEL: "1", OWNER_LABEL: f"{host}:{_dead_pid()}"})
    alive = FakeContainer({}, {SMOKE_LABEL: "1", OWNER_LABEL: f"{host}:{os.getpid()}"})
    elsewhere = FakeContainer({}, {SMOKE_LABEL: "1", OWNER_LABEL: "other-machine:1"})
    unlabelled = FakeContainer({}, {SMOKE_LABEL: "1"})
    containers = FakeContainers(existing=[dead, alive, elsewhere, unlabelled])
    assert make_tester(containers).remove_leftovers() == 1
    assert dead.removed
    assert not alive.removed and not elsewhere.removed and not unlabelled.removed
