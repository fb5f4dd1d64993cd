"""A model with big weights through the service on its default (native) path, for real.

Version 1 is built natively; version 2 keeps the weights and changes a small file (its MLmodel):
it is assembled in the registry, its weights layer is found there and not uploaded again, the
image serves, and its SBOM (from version 1's, not from its layers) lists what its Python sees.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support.big_models import log_weights_model, write_weights
from support.jobs import build_of, job_detail, wait_for_job
from support.servers import free_port

pytestmark = pytest.mark.integration

WEIGHTS = 80 << 20
PLAIN_LAYER = "application/vnd.oci.image.layer.v1.tar"
VENV_PYTHON = "/opt/mlflow-dock/venv/bin/python"
INSTALLED = (
    "import importlib.metadata as m, json; print(json.dumps("
    "[{'name': d.metadata['Name'], 'version': d.version} for d in m.distributions()]))"
)


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_a_version_that_keeps_its_weights_uploads_none_of_them_and_serves(
    service_factory, webhook_factory, mlflow_server, registry, docker_client, model_name, tmp_path
):
    service = service_factory(
        # Smoke tests are tested elsewhere; the image is run below instead, once.
        MLFLOW_DOCK_SMOKE_TEST="false",
        MLFLOW_DOCK_MODEL_FILE_LAYER_MIB="16",
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    weights = write_weights(tmp_path / "weights.bin", WEIGHTS)

    jobs = []
    for marker in ("one", "two"):
        version = log_weights_model(mlflow_server.url, model_name, weights, marker=marker).version
        assert version is not None
        job = wait_for_job(service, build_of(model_name, version))
        assert job["state"] == "succeeded", job
        jobs.append(job)
    logs = ["\n".join(job_detail(service, job["id"])["log_tail"]) for job in jobs]
    for log in logs:
        print(next(line for line in log.splitlines() if "model file" in line))
    assert "without an engine" in logs[0]
    assert "in the registry on top of version" in logs[1]
    assert "weights.bin (80.0 MiB)" in logs[0] and "(plain tar) uploaded" in logs[0]
    assert "(plain tar) already in the registry, not uploaded" in logs[1], logs[1]
    assert "Python packages, as built)" in logs[0]
    assert f"Python packages, those of {jobs[0]['digest'][:19]}'s SBOM)" in logs[1], logs[1]

    path = naming.repository_name(model_name)
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        layers = [json.loads(client.get_manifest(path, j["digest"]).body)["layers"] for j in jobs]
        weight_layers = [[d for d in found if d["mediaType"] == PLAIN_LAYER] for found in layers]
        assert len(weight_layers[0]) == 1 and weight_layers[0] == weight_layers[1]
        assert weight_layers[0][0]["size"] > WEIGHTS
        assert layers[0][-1] != layers[1][-1]  # the rest of the model: another MLmodel
        sbom = client.get_manifest(path, f"sha256-{jobs[1]['digest'][7:]}.sbom")
        bom = json.loads(client.get_blob(path, json.loads(sbom.body)["layers"][0]["digest"]))
    listed = {
        canonical(c["name"]): c["version"] for c in bom["components"] if c["type"] == "library"
    }

    image = f"{registry.host}/{path}@{jobs[1]['digest']}"
    docker_client.images.pull(image, auth_config=registry.auth_config)
    port = free_port()
    container = docker_client.containers.run(
        image, detach=True, ports={"8080/tcp": ("127.0.0.1", port)}
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(container.logs(tail=30).decode())
        answer = httpx.post(
            f"{url}/invocations", json={"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0] == {"weights_bytes": WEIGHTS, "marker": "two"}
        code, output = container.exec_run([VENV_PYTHON, "-c", INSTALLED])
        assert code == 0, output
    finally:
        container.remove(force=True)
        docker_client.images.remove(image, force=True)
    # The SBOM written from builder knowledge lists exactly what the image's Python sees.
    assert listed == {canonical(p["name"]): p["version"] for p in json.loads(output)}
