"""A model with big weights through the service on its default (native) path, for real.

The service reads versions in place from the tracking server's artifact store
(MLFLOW_DOCK_ARTIFACTS_DESTINATION). Version 1 is built natively and fully smoke-tested;
version 2 keeps the weights and changes a small file (its MLmodel): it is assembled in the
registry, its weights layer is found there and not uploaded again, its warm smoke test links to
the weights version 1's image holds instead of copying them, the image serves, and its SBOM
(from version 1's, not from its layers) lists what its Python sees. Version 3 brings new weights
(uploaded, copied once into the warm runtime); version 4 keeps them (nothing uploaded or copied).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support import web
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
        MLFLOW_DOCK_MODEL_FILE_LAYER_MIB="16",
        MLFLOW_DOCK_ARTIFACTS_DESTINATION=str(mlflow_server.artifacts_dir),
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    weights = write_weights(tmp_path / "weights.bin", WEIGHTS)
    other_weights = write_weights(tmp_path / "other" / "weights.bin", WEIGHTS)

    jobs = []
    for marker, path in (
        ("one", weights),
        ("two", weights),
        ("three", other_weights),
        ("four", other_weights),
    ):
        version = log_weights_model(mlflow_server.url, model_name, path, marker=marker).version
        assert version is not None
        job = wait_for_job(service, build_of(model_name, version))
        assert job["state"] == "succeeded", job
        jobs.append(job)
    logs = ["\n".join(job_detail(service, job["id"])["log_tail"]) for job in jobs]
    for log in logs:
        print(next(line for line in log.splitlines() if "model file" in line))
        assert "read model in place" in log and "downloaded model" not in log
    # The warm smoke test copies the weights into its runtime once: version 2's are version
    # 1's image's, version 3 brings new ones, version 4 keeps version 3's.
    assert "smoke test passed (" in logs[0]
    not_copied = "1 of 1 big model file(s) not copied, the warm runtime holds them"
    assert [not_copied in log for log in logs[1:]] == [True, False, True], logs[1:]
    assert all("smoke test passed in a warm runtime" in log for log in logs[1:])
    assert "(plain tar) uploaded" in logs[2]
    assert "(plain tar) already in the registry, not uploaded" in logs[3], logs[3]
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
        assert weight_layers[2] == weight_layers[3] != weight_layers[0]
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
                if web.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(container.logs(tail=30).decode())
        answer = web.post(
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
