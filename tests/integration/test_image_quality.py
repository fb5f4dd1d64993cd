"""What the layered builder promises about images: a failing image is never published,
build-only inputs (index credentials, CA bundle) never reach the image or its history, and its
images run mlflow-dock's server (MLflow's protocol and V2) as the version they are, also when
the next version is assembled on an engine-built one."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import time
import uuid

import httpx

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support.jobs import created_payload, job_detail, signed_delivery, wait_for_job
from support.servers import free_port, log_sklearn_model

# The sklearn model's own pins: the broken model shares its runtime image, so the test exercises
# the smoke test rather than another 60 s of pip installs.
SKLEARN_REQUIREMENTS = [
    f"{dist}=={importlib.metadata.version(dist)}"
    for dist in ("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")
]


def deliver_created(service, secret, model_name, version):
    response = signed_delivery(service, secret, created_payload(model_name, version))
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def wait_finished(service, job_id, timeout=900):
    wait_for_job(service, lambda j: j["id"] == job_id, timeout=timeout)
    return job_detail(service, job_id, log_lines=2000)


def test_failing_smoke_test_publishes_nothing(
    service_factory, mlflow_server, mlflow_client, registry, model_name
):
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host")
    secret = service_factory.secret
    path = naming.repository_name(model_name)
    client = RegistryClient(registry.host, username=registry.username, password=registry.password)

    # First build: a broken first version is built, fails its smoke test and is never tagged.
    broken = log_sklearn_model(
        mlflow_server.url, model_name, broken=True, pip_requirements=SKLEARN_REQUIREMENTS
    )
    job = wait_finished(service, deliver_created(service, secret, model_name, broken))
    assert job["state"] == "failed" and job["error"].startswith("smoke test"), job
    assert "deliberately broken" in job["error"]  # the container's log tail is the reason
    assert client.manifest_digest(path, broken) is None

    # Registry path: a good version, then a broken one assembled untagged, never tagged.
    good = log_sklearn_model(mlflow_server.url, model_name, pip_requirements=SKLEARN_REQUIREMENTS)
    assert (
        wait_finished(service, deliver_created(service, secret, model_name, good))["state"]
        == "succeeded"
    )
    broken2 = log_sklearn_model(
        mlflow_server.url, model_name, broken=True, pip_requirements=SKLEARN_REQUIREMENTS
    )
    job2 = wait_finished(service, deliver_created(service, secret, model_name, broken2))
    assert job2["state"] == "failed" and job2["error"].startswith("smoke test"), job2
    assert any("assembled" in line for line in job2["log_tail"])
    assert client.manifest_digest(path, broken2) is None
    assert client.manifest_digest(path, good) is not None

    # The failure is visible where data scientists look, too.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tags = mlflow_client.get_model_version(model_name, broken2).tags
        if tags.get("mlflow_dock.status") == "failed":
            break
        time.sleep(0.5)
    assert tags.get("mlflow_dock.status") == "failed"
    assert tags["mlflow_dock.error"].startswith("smoke test")
    client.close()


def test_index_credentials_and_ca_bundle_stay_out_of_the_image(
    service_factory, mlflow_server, docker_client, registry, model_name
):
    index_secret = f"idx-{uuid.uuid4().hex[:12]}"
    index_url = f"https://dock-user:{index_secret}@pypi.org/simple"
    service = service_factory(
        MLFLOW_DOCK_BUILD_NETWORK="host",
        MLFLOW_DOCK_SMOKE_TEST="false",
        MLFLOW_DOCK_PIP_INDEX_URL=index_url,
        # About the engine's build stages (pip.conf, CA bundle in a discarded stage).
        MLFLOW_DOCK_BUILDER="layered",
    )
    version = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_finished(
        service, deliver_created(service, service_factory.secret, model_name, version)
    )
    assert job["state"] == "succeeded", job
    log = "\n".join(job["log_tail"])
    # pip used the configured index (and masked its password itself) ...
    assert "Looking in indexes: https://dock-user:****@pypi.org/simple" in log
    # ... and nothing of ours wrote the secret anywhere the user can read.
    assert index_secret not in log
    assert index_secret not in service.log_text()
    assert index_secret not in json.dumps(httpx.get(f"{service.url}/builds").json())

    image = docker_client.images.get(job["image"])
    steps = "\n".join(step["CreatedBy"] for step in image.history())
    assert "/opt/ml/model" in steps and "/opt/mlflow-dock/venv" in steps
    assert index_secret not in steps
    assert "ca-bundle.crt" not in steps and "mlflow-dock-build" not in steps
    listing = docker_client.containers.run(
        job["image"],
        ["sh", "-c", "ls -a /tmp; ls /opt/mlflow-dock; cat /etc/pip.conf 2>/dev/null; true"],
        remove=True,
        network_mode="host",
    ).decode()
    assert "mlflow-dock-build" not in listing and index_secret not in listing
    config = json.dumps(image.attrs["Config"])
    assert index_secret not in config and "PIP_CONFIG_FILE" not in config

    # The engine's images run mlflow-dock's server as their version (ENV after the model), and
    # so does the next version, assembled in the registry on the engine-built one.
    second = log_sklearn_model(mlflow_server.url, model_name)
    assembled = wait_finished(
        service, deliver_created(service, service_factory.secret, model_name, second)
    )
    assert assembled["state"] == "succeeded", assembled
    assert any("assembled" in line for line in assembled["log_tail"]), assembled["log_tail"]
    for number, built in ((version, job), (second, assembled)):
        assert built["v2_model"] == model_name
        assert_answers_v2(docker_client, registry, built["image"], model_name, number)


def assert_answers_v2(docker_client, registry, image, model_name, version):
    docker_client.images.pull(image, auth_config=registry.auth_config)
    port = free_port()
    container = docker_client.containers.run(
        image, detach=True, network_mode="host", environment={"PORT": str(port)}
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        metadata = httpx.get(f"{url}/v2/models/{model_name}/versions/{version}", timeout=10)
        assert metadata.status_code == 200, container.logs().decode()[-2000:]
        assert metadata.json()["versions"] == [version]
        assert httpx.get(f"{url}/ping", timeout=10).status_code == 200
    finally:
        container.remove(force=True)
