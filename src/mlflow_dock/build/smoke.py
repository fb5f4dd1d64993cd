"""Smoke test of a built image before anything is pushed: it must answer /ping, and its
logged serving input example (if any) must get a 200 from /invocations."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from mlflow_dock.build.dockerfile import SERVING_PORT
from mlflow_dock.build.engine import DockerEngine
from mlflow_dock.errors import PermanentError
from mlflow_dock.jobs.model import LogSink


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SMOKE_LABEL = "io.mlflow-dock.smoke-test"
# Which process started a smoke container: "<hostname>:<pid>". Several services (or a test
# suite beside a running service) may share one engine; only a dead owner's containers are
# leftovers, a live neighbour's are its own business.
OWNER_LABEL = "io.mlflow-dock.smoke-owner"


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_gone(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        # Another machine's process (an engine shared over DOCKER_HOST): we cannot tell.
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class SmokeTester:
    def __init__(
        self,
        engine: DockerEngine,
        *,
        network_mode: str | None,
        timeout_seconds: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._engine = engine
        self._network_mode = network_mode
        self._timeout = timeout_seconds
        self._sleep = sleep

    def remove_leftovers(self) -> int:
        """Remove smoke-test containers a killed process left running; returns how many."""
        client = self._engine.client
        leftovers = [
            container
            for container in client.containers.list(all=True, filters={"label": SMOKE_LABEL})
            if _owner_is_gone(container.labels.get(OWNER_LABEL, ""))
        ]
        for container in leftovers:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        return len(leftovers)

    def check(self, image: str, example: Path | None, log: LogSink) -> None:
        container, base_url = self._start(image)
        try:
            log(f"smoke test: waiting for {image} to answer /ping")
            self._wait_for_ping(container, base_url)
            if example is not None:
                response = httpx.post(
                    f"{base_url}/invocations",
                    content=example.read_bytes(),
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                )
                if response.status_code != 200:
                    raise PermanentError(
                        f"smoke test: /invocations with the model's input example answered "
                        f"{response.status_code}: {response.text[:300]}"
                    )
                log(f"smoke test: /invocations answered 200: {response.text[:200]}")
            log("smoke test passed")
        finally:
            # A leftover test container must not fail the build.
            with contextlib.suppress(Exception):
                container.remove(force=True)

    def _start(self, image: str) -> tuple[Any, str]:
        name = f"mlflow-dock-smoke-{uuid.uuid4().hex[:12]}"
        client = self._engine.client
        if self._network_mode == "host":
            # On the host network the container's port is the host's; pick a free one so
            # parallel smoke tests and anything already on 8080 do not collide.
            port = _free_port()
            container = client.containers.run(
                image,
                name=name,
                detach=True,
                network_mode="host",
                # The image's own CMD honours $PORT, so the smoke test runs what users run.
                environment={"PORT": str(port)},
                labels={SMOKE_LABEL: "1", OWNER_LABEL: _this_process()},
            )
            return container, f"http://127.0.0.1:{port}"
        container = client.containers.run(
            image,
            name=name,
            detach=True,
            network_mode=self._network_mode,
            labels={SMOKE_LABEL: "1", OWNER_LABEL: _this_process()},
        )
        container.reload()
        address = container.attrs["NetworkSettings"]["IPAddress"]
        return container, f"http://{address}:{SERVING_PORT}"

    def _wait_for_ping(self, container: Any, base_url: str) -> None:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            container.reload()
            if container.status in ("exited", "dead"):
                raise PermanentError(
                    "smoke test: the container exited before answering /ping: "
                    + _log_tail(container)
                )
            try:
                if httpx.get(f"{base_url}/ping", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            self._sleep(0.5)
        raise PermanentError(
            f"smoke test: no answer on /ping within {int(self._timeout)} s; log tail: "
            + _log_tail(container)
        )


def _log_tail(container: Any, lines: int = 15) -> str:
    """The container's last log line first (usually the exception), then the tail for context."""
    try:
        raw = container.logs(tail=lines).decode("utf-8", "replace")
    except Exception:
        return "(container log unavailable)"
    kept = [line.strip() for line in raw.splitlines() if line.strip()]
    if not kept:
        return "(the container logged nothing)"
    return f"{kept[-1][:300]}; log tail: " + " | ".join(kept)[-1200:]
