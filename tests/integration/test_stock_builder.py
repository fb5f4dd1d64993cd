"""MLFLOW_DOCK_BUILDER=mlflow end to end: webhook -> MLflow's stock Dockerfile -> smoke test ->
registry -> a serving container. One build only: a stock build installs full mlflow and nginx
from scratch for every version (minutes), so this is the suite's slowest single build."""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any

import docker.errors
import httpx

from mlflow_dock import naming
from support.servers import free_port, log_sklearn_model

# Measured here at about 3 minutes on 2 CPUs; generous for a cold pip cache and slow mirrors.
BUILD_TIMEOUT = 900


def wait_for_build(service: Any, model: str, version: str) -> dict[str, Any]:
    deadline = time.monotonic() + BUILD_TIMEOUT
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{service.url}/builds", timeout=10).json()
        for job in jobs:
            if (
                job["kind"] == "build"
                and job["model_name"] == model
                and job["version"] == version
                and job["state"] in ("succeeded", "failed")
            ):
                return job
        time.sleep(2)
    raise AssertionError(f"no finished build within {BUILD_TIMEOUT} s; jobs: {jobs}")


def seconds(job: dict[str, Any], start: str, end: str) -> float:
    def parse(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    return parse(job[end]) - parse(job[start])


def predict_on_host_port(docker_client: Any, image: str) -> list[Any]:
    """Run the image as platforms do (host network, $PORT injected) and ask for predictions."""
    port = free_port()
    container = docker_client.containers.run(
        image, detach=True, network_mode="host", environment={"PORT": str(port)}
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                # nginx answers 502 until uvicorn is up; only a 200 means ready.
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(container.logs().decode()[-3000:])
        payload = {
            "dataframe_split": {
                "columns": [
                    "sepal length (cm)",
                    "sepal width (cm)",
                    "petal length (cm)",
                    "petal width (cm)",
                ],
                "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]],
            }
        }
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=30)
        assert response.status_code == 200, response.text
        # Stock serving: nginx in front, as MLflow documents it.
        assert "nginx" in response.headers.get("server", ""), response.headers
        return list(response.json()["predictions"])
    finally:
        container.remove(force=True)


def test_mlflow_builder_pushes_mlflows_stock_image(
    service_factory: Any,
    webhook_factory: Any,
    mlflow_server: Any,
    registry: Any,
    docker_client: Any,
    model_name: str,
) -> None:
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host", MLFLOW_DOCK_BUILDER="mlflow")
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    time.sleep(2)  # MLflow caches the webhook list (TTL 1 s in the fixture server)

    version = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_for_build(service, model_name, version)
    detail = httpx.get(f"{service.url}/builds/{job['id']}", timeout=10).json()
    assert job["state"] == "succeeded", (job, detail["log_tail"][-40:])
    build_seconds = seconds(job, "started_at", "finished_at")
    print(f"stock build (download, build, smoke test, push): {build_seconds:.0f} s")
    log = "\n".join(detail["log_tail"])
    assert "smoke test passed" in log
    assert registry.password not in log

    repository = f"{registry.host}/{naming.repository_name(model_name)}"
    image = f"{repository}:{version}"
    assert job["image"] == image and job["digest"].startswith("sha256:")

    # What users get is what the registry holds: pull it afresh.
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(image, force=True)
    docker_client.images.pull(image, auth_config=registry.auth_config)
    assert predict_on_host_port(docker_client, image) == [0, 2]

    pulled = docker_client.images.get(image)
    steps = "\n".join(str(layer.get("CreatedBy", "")) for layer in pulled.history())
    # MLflow's stock steps, in the image's own history.
    assert "apt-get install -y --no-install-recommends nginx" in steps
    assert "pip install mlflow==" in steps
    assert "C._install_pyfunc_deps('/opt/ml/model'" in steps
    assert "MLFLOW_DISABLE_ENV_CREATION=True" in steps
    # The documented trade-off: build inputs are deleted in a later layer (history keeps it).
    assert "rm -rf /tmp/mlflow-dock-build" in steps
    assert pulled.labels["io.mlflow-dock.model.version"] == version
    assert pulled.labels["io.mlflow-dock.model.name"] == model_name
