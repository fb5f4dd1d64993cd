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

from mlflow_dock.oci import reference as naming
from support.jobs import build_of, invoke, wait_for_job
from support.servers import log_sklearn_model

# Measured here at about 3 minutes on 2 CPUs; generous for a cold pip cache and slow mirrors.
BUILD_TIMEOUT = 900


def wait_for_build(service: Any, model: str, version: str) -> dict[str, Any]:
    return wait_for_job(service, build_of(model, version), timeout=BUILD_TIMEOUT)


def seconds(job: dict[str, Any], start: str, end: str) -> float:
    def parse(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    return parse(job[end]) - parse(job[start])


def predict_on_host_port(docker_client: Any, image: str) -> list[Any]:
    """Run the image as platforms do (host network, $PORT injected) and ask for predictions."""
    response = invoke(docker_client, image)
    assert response.status_code == 200, response.text
    # Stock serving: nginx in front, as MLflow documents it.
    assert "nginx" in response.headers.get("server", ""), response.headers
    return list(response.json()["predictions"])


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
        docker_client.images.remove(image, force=True, noprune=True)
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
