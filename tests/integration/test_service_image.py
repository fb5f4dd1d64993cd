"""The service's own image (repo-root Dockerfile): builds offline-from-registries on the test
base, serves /health as uid 10001 with access to the Engine through the mounted socket, fails
fast on bad configuration, and carries none of its build-only inputs.

The image is built once per module from a temporary copy of the files the Dockerfile needs, so
the optional `.build/` directory (the host CA bundle that pip needs to reach PyPI here) never
appears in the working tree. Cold build: about 2 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from docker.models.containers import Container
from docker.models.images import Image

from mlflow_dock.imaging.smoke import OWNER_LABEL, SMOKE_LABEL, owner_of
from support import web
from support.servers import free_port
from support.service_image import ImageBuildError, build_image, service_build_context

# The module fixture builds the service image: its tests share one xdist worker.
pytestmark = pytest.mark.xdist_group("service-image")

UID = "10001"
DATA_DIR = "/var/lib/mlflow-dock"
REQUIRED_ENV = {
    "MLFLOW_WEBHOOK_SECRET": "image-test-webhook-secret",
    "DOCKER_USERNAME": "dock",
    "DOCKER_REGISTRY_PASSWORD": "image-test-registry-password",
}
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def service_image(
    docker_client: docker.DockerClient,
    base_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Image]:
    context = service_build_context(tmp_path_factory.mktemp("service-image-context"))
    tag = f"mlflow-dock-service-test:{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        image = build_image(
            docker_client,
            context,
            tag,
            buildargs={"BASE_IMAGE": base_image, "VERSION": "0.0.0-test"},
        )
    except ImageBuildError as exc:
        pytest.fail(f"service image build failed: {exc}", pytrace=False)
    print(f"service image {tag} built in {time.monotonic() - started:.1f}s")
    yield image
    # Only the final stage's layers go: the builder stage's cached layers stay for the next run.
    try:
        docker_client.images.remove(tag, force=True, noprune=True)
    except docker.errors.APIError as exc:
        print(f"could not remove {tag}: {exc}")


ContainerFactory = Callable[..., Container]


@pytest.fixture
def run_container(docker_client: docker.DockerClient) -> Iterator[ContainerFactory]:
    """Start detached containers; all are removed (with their anonymous volumes) at teardown."""
    started: list[Container] = []

    def run(image: Image, command: list[str] | None = None, **kwargs: Any) -> Container:
        container = docker_client.containers.run(image.id, command, detach=True, **kwargs)
        started.append(container)
        return container

    yield run
    for container in started:
        try:
            container.remove(force=True, v=True)
        except docker.errors.APIError as exc:
            print(f"could not remove container {container.short_id}: {exc}")


def _engine_access() -> dict[str, Any]:
    """How a container reaches this test's Docker Engine: the socket plus its group, or TCP."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        socket_path = host.removeprefix("unix://")
        return {
            "volumes": {socket_path: {"bind": "/var/run/docker.sock", "mode": "rw"}},
            "group_add": [str(os.stat(socket_path).st_gid)],
            "environment": {},
        }
    return {"volumes": {}, "group_add": [], "environment": {"DOCKER_HOST": host}}


def _exec(container: Container, argv: list[str]) -> str:
    result = container.exec_run(argv)
    output = result.output.decode(errors="replace")
    assert result.exit_code == 0, f"{argv} exited {result.exit_code}: {output}"
    return output.strip()


def _wait_healthy(container: Container, url: str, timeout: float = 90.0) -> None:
    """Until /health answers 200 and the image's own HEALTHCHECK reports healthy."""
    deadline = time.monotonic() + timeout
    answered = False
    while True:
        container.reload()
        if container.status == "exited":
            logs = container.logs().decode(errors="replace")
            pytest.fail(f"service container exited early:\n{logs[-4000:]}", pytrace=False)
        if not answered:
            with contextlib.suppress(httpx.HTTPError):
                answered = web.get(url, timeout=2).status_code == 200
        health = container.attrs["State"].get("Health", {}).get("Status")
        if answered and health == "healthy":
            return
        if time.monotonic() > deadline:
            logs = container.logs().decode(errors="replace")
            pytest.fail(
                f"not healthy after {timeout:.0f}s (answered={answered}, health={health}):\n"
                f"{logs[-4000:]}",
                pytrace=False,
            )
        time.sleep(0.5)


def test_serves_health_as_non_root_with_engine_access(
    service_image: Image,
    run_container: ContainerFactory,
    docker_client: docker.DockerClient,
    base_image: str,
) -> None:
    config = service_image.attrs["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["mlflow-dock"]
    assert config["Cmd"] == ["serve"]
    assert config["WorkingDir"] == DATA_DIR
    assert config["Env"].count(f"MLFLOW_DOCK_DATA_DIR={DATA_DIR}") == 1
    assert DATA_DIR in config["Volumes"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Labels"]["org.opencontainers.image.title"] == "mlflow-dock"
    assert config["Labels"]["org.opencontainers.image.version"] == "0.0.0-test"

    # A running smoke test of a service on this host. The service below, on the host's network,
    # has the host's name but its own PIDs: at start it removes crashed owners' leftovers, and
    # must not take this live process for a dead one of its own.
    neighbour = run_container(
        docker_client.images.get(base_image),
        ["sleep", "600"],
        network_mode="none",
        labels={SMOKE_LABEL: "1", OWNER_LABEL: owner_of(os.getpid())},
    )
    port = free_port()
    access = _engine_access()
    container = run_container(
        service_image,
        environment={
            **REQUIRED_ENV,
            **QUIET_ENV,
            **access["environment"],
            "PORT": str(port),
            # No MLflow server here: the periodic reconcile would only log connection errors.
            "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
        },
        network_mode="host",
        volumes=access["volumes"],
        group_add=access["group_add"],
        # The image's own check, run every second instead of every 30s.
        healthcheck={
            "test": config["Healthcheck"]["Test"],
            "interval": 1_000_000_000,
            "timeout": 5_000_000_000,
            "retries": 3,
        },
    )
    _wait_healthy(container, f"http://127.0.0.1:{port}/health")
    assert web.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {"status": "healthy"}
    neighbour.reload()  # NotFound if the service removed it
    assert neighbour.status == "running"

    assert _exec(container, ["id", "-u"]) == UID
    # The server process itself, not only execs, runs unprivileged.
    status = _exec(container, ["cat", "/proc/1/status"])
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [UID] * 4
    # The socket's group is what lets a non-root user build: the SDK must reach the Engine.
    assert _exec(container, ["python", "-c", "import docker; print(docker.from_env().ping())"]) == (
        "True"
    )
    # The job store went into the volume, owned by the service user.
    assert "jobs.db" in _exec(container, ["ls", DATA_DIR]).split()


def test_cli_help_runs_in_image(docker_client: docker.DockerClient, service_image: Image) -> None:
    output = docker_client.containers.run(
        service_image.id, ["--help"], remove=True, network_mode="none"
    ).decode()
    for command in ("serve", "build", "backfill"):
        assert command in output


def test_missing_required_variable_exits_2_with_one_line(
    service_image: Image, run_container: ContainerFactory
) -> None:
    environment = {k: v for k, v in REQUIRED_ENV.items() if k != "MLFLOW_WEBHOOK_SECRET"}
    container = run_container(
        service_image, environment={**environment, **QUIET_ENV}, network_mode="none"
    )
    result = container.wait(timeout=60)
    stderr = container.logs(stdout=False, stderr=True).decode().strip()
    stdout = container.logs(stdout=True, stderr=False).decode().strip()
    assert result["StatusCode"] == 2, stderr
    assert stderr == "mlflow-dock: error: MLFLOW_WEBHOOK_SECRET is required but not set"
    assert stdout == ""


def test_build_only_inputs_are_not_in_the_image(
    docker_client: docker.DockerClient, service_image: Image
) -> None:
    script = (
        "ls -A /tmp; "
        "find / -xdev \\( -name ca-bundle.crt -o -name pip.conf -o -name requirements.txt "
        "-o -name build-tools -o -name .build -o -path /tmp/build -o -path /src \\) -print; "
        # hatchling and pip stay in the builder; the runtime venv only runs the service (uv is
        # a runtime dependency: the native builder installs wheels with it).
        'for m in pip hatchling; do python -c "import $m" 2>/dev/null && echo has-$m; done; '
        "true"
    )
    output = docker_client.containers.run(
        service_image.id, ["-c", script], entrypoint="sh", remove=True, network_mode="none"
    ).decode()
    assert output.strip() == ""

    for layer in service_image.history():
        created_by = layer.get("CreatedBy", "")
        for needle in ("/tmp/build", "ca-bundle", "PIP_CERT", "pip.conf"):
            assert needle not in created_by, created_by
