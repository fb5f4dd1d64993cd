"""What the layered builder promises about images: a failing image is never published, neither
the first version (built by the engine) nor a later one (assembled in the registry).

That build-only inputs (index credentials, CA bundle) never reach a layered image or its
history, and that its images run mlflow-dock's server (MLflow's protocol and V2) as the version
they are, also when the next version is assembled on an engine-built one, is tested in
test_build_secrets.py, on the layered build it makes through a private index anyway.
"""

from __future__ import annotations

import importlib.metadata
import time

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support.jobs import created_payload, job_detail, signed_delivery, wait_for_job
from support.servers import log_sklearn_model

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
