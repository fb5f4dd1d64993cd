"""Model code is confined wherever mlflow-dock runs it (real MLflow, registry, engine, service).

Adversarial pyfunc models (tests/support/log_model.py) go through the whole service: one that
tries to reach services on the host from ``load_context``, one that takes more memory than the
smoke-test limit, one that never finishes loading. One service for the module (512 MiB, 60 s):
the runtime those models share is installed once, and each test stays a build or two.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from mlflow.entities.webhook import Webhook

from mlflow import MlflowClient
from mlflow_dock.imaging.smoke import OWNER_LABEL, SMOKE_LABEL
from mlflow_dock.imaging.warm import WARM_LABEL
from support.jobs import build_of, job_detail, wait_for_job
from support.servers import ServiceProcess, log_sklearn_model, register_model_version

# One worker runs the module: its tests share one service (module_service_factory).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("confinement")]

TIMEOUT_SECONDS = 60


class Listener:
    """Accepts TCP connections on ``address`` and counts them (a service on the host)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.connections: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.connections.append(peer)
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def service(module_service_factory: Any, mlflow_server: Any) -> Iterator[ServiceProcess]:
    """One service for the module: 512 MiB and 60 s per smoke test; its webhook in MLflow."""
    factory = module_service_factory
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    service = factory(
        MLFLOW_DOCK_BUILD_NETWORK="host",
        MLFLOW_DOCK_SMOKE_MEMORY="512m",
        MLFLOW_DOCK_SMOKE_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS),
    )
    hook: Webhook = client.create_webhook(
        name=f"confinement-{uuid.uuid4().hex[:8]}",
        url=f"{service.url}/webhook",
        events=["model_version.created"],
        secret=factory.secret,
    )
    time.sleep(1.2)  # MLflow caches the webhook list (TTL 1 s in the fixture server)
    try:
        yield service
    finally:
        # A webhook left behind would keep firing at a dead port for later tests' versions.
        client.delete_webhook(hook.webhook_id)


def _build(service: ServiceProcess, model: str, version: str) -> dict[str, Any]:
    return wait_for_job(service, build_of(model, version))


def _log(service: ServiceProcess, job: dict[str, Any]) -> str:
    return "\n".join(job_detail(service, job["id"])["log_tail"])


def _smoke_containers(client: docker.DockerClient, service: ServiceProcess) -> list[Any]:
    return [
        c
        for c in client.containers.list(all=True, filters={"label": SMOKE_LABEL})
        if c.labels.get(OWNER_LABEL, "").endswith(f":{service.pid}")
    ]


def _bridge_gateway(client: docker.DockerClient) -> str:
    """The host's address on Docker's default bridge (docker0), where containers reach it."""
    ipam = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    # The default bridge's IPAM often names only the subnet; docker0 takes its first address.
    return str(ipam.get("Gateway") or ipaddress.ip_network(ipam["Subnet"])[1])


def test_model_code_reaches_nothing_on_the_host_and_each_model_has_its_own_warm_runtime(
    service: ServiceProcess, mlflow_server: Any, docker_client: docker.DockerClient
) -> None:
    gateway = _bridge_gateway(docker_client)
    everywhere, on_bridge = Listener("0.0.0.0"), Listener(gateway)
    targets = {
        "gateway": (gateway, everywhere.port),
        "bridge-listener": (gateway, on_bridge.port),
        "loopback": ("127.0.0.1", everywhere.port),
        "metadata": ("169.254.169.254", 80),
        "postgres": (gateway, 5432),
        "redis": (gateway, 6379),
    }
    try:
        models = [f"Dock probe {name} {uuid.uuid4().hex[:8]}" for name in ("a", "b")]
        for model in models:
            first = log_sklearn_model(
                mlflow_server.url, model, pyfunc="probe", probe_targets=targets
            )
            job = _build(service, model, first)
            log = _log(service, job)
            # Designed outcome: the model loads (every connection failed at once, no route)
            # and the smoke test passes; what the model saw is in its answer.
            assert job["state"] == "succeeded", log
            assert "smoke test passed" in log and "gateway=ENETUNREACH" in log, log
            assert "loopback=ECONNREFUSED" in log and "CONNECTED" not in log, log
            second = register_model_version(
                mlflow_server.url, model, from_model=model, from_version=first
            )
            job = _build(service, model, second)
            log = _log(service, job)
            assert job["state"] == "succeeded", log
            assert "passed in a warm runtime" in log and "gateway=ENETUNREACH" in log, log
            assert "metadata=ENETUNREACH" in log and "CONNECTED" not in log, log
        assert everywhere.connections == [] and on_bridge.connections == []
    finally:
        everywhere.close()
        on_bridge.close()

    # Same requirements, two models: two warm containers, each from its own model's image.
    warm = [c for c in _smoke_containers(docker_client, service) if WARM_LABEL in c.labels]
    images = sorted(c.attrs["Config"]["Image"].split("@")[0] for c in warm)
    assert len(warm) == 2 and images[0] != images[1], images
    host = warm[0].attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and host["Memory"] == 512 * 1024**2
    assert warm[0].attrs["Config"]["User"] == "10001:10001"


def test_a_model_over_the_memory_limit_fails_its_smoke_test(
    service: ServiceProcess, mlflow_server: Any
) -> None:
    model = f"Dock hog {uuid.uuid4().hex[:8]}"
    job = _build(service, model, log_sklearn_model(mlflow_server.url, model, pyfunc="hog"))
    assert job["state"] == "failed", job
    assert "memory limit (512 MiB, MLFLOW_DOCK_SMOKE_MEMORY)" in job["error"], job["error"]
    assert job["attempts"] == 1  # permanent: another try would be killed the same way


def test_a_model_that_never_loads_hits_the_deadline_and_is_removed(
    service: ServiceProcess, mlflow_server: Any, docker_client: docker.DockerClient
) -> None:
    model = f"Dock sleeper {uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    job = _build(service, model, log_sklearn_model(mlflow_server.url, model, pyfunc="sleeper"))
    assert job["state"] == "failed", job
    assert f"no answer on /ping within {TIMEOUT_SECONDS} s" in job["error"], job["error"]
    assert time.monotonic() - started < TIMEOUT_SECONDS + 120
    # Only warm containers (other tests' models) are left; no full smoke-test container.
    left = [c for c in _smoke_containers(docker_client, service) if WARM_LABEL not in c.labels]
    assert left == []
