"""The product loop against real parts: MLflow server -> signed webhook -> mlflow-dock ->
Docker Engine -> authenticated CNCF Distribution registry -> a serving container."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime

import docker.errors
import pytest

from mlflow_dock.imaging.smoke import OWNER_LABEL, owner_of
from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support import web
from support.jobs import (
    alias_of,
    build_of,
    created_payload,
    invoke,
    signed_delivery,
    wait_for_job,
)
from support.servers import log_sklearn_model


def created_to_pushed(mlflow_client, job) -> float:
    """Seconds from MLflow's creation of the version to the job's finish (same machine clock)."""
    created = mlflow_client.get_model_version(job["model_name"], job["version"]).creation_timestamp
    finished = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")).timestamp()
    return finished - created / 1000


def wait_for_tags(mlflow_client, model, version, key, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tags = mlflow_client.get_model_version(model, version).tags
        if key in tags:
            return tags
        time.sleep(0.5)
    raise AssertionError(f"tag {key} never appeared on {model} v{version}: {tags}")


def predict(docker_client, image, registry):
    """Pull the pushed image afresh, run it and ask it for predictions."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(image, force=True, noprune=True)
    docker_client.images.pull(image, auth_config=registry.auth_config)
    response = invoke(docker_client, image)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_registered_versions_and_aliases_become_images(
    service_factory,
    webhook_factory,
    mlflow_server,
    mlflow_client,
    registry,
    docker_client,
    model_name,
):
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host")
    webhook_factory(
        f"{service.url}/webhook",
        service_factory.secret,
        events=(
            "model_version.created",
            "model_version_alias.created",
            "model_version_alias.deleted",
        ),
    )
    time.sleep(2)  # MLflow caches the webhook list (TTL 1 s in the fixture server)

    version = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_for_job(service, build_of(model_name, version))
    assert job["state"] == "succeeded", job
    repository = f"{registry.host}/{naming.repository_name(model_name)}"
    assert naming.repository_name(model_name) != model_name  # the name needed sanitising
    assert job["image"] == f"{repository}:{version}"
    assert job["digest"].startswith("sha256:")
    detail = web.get(f"{service.url}/builds/{job['id']}").json()
    assert any("published" in line for line in detail["log_tail"])
    assert all(registry.password not in line for line in detail["log_tail"])

    image = f"{repository}:{version}"
    predictions = predict(docker_client, image, registry)
    assert predictions == [0, 2]
    labels = docker_client.images.get(image).labels
    assert labels["org.opencontainers.image.version"] == version
    assert labels["io.mlflow-dock.model.name"] == model_name
    config = docker_client.images.get(image).attrs["Config"]
    assert config["User"] == "10001:10001" and "8080/tcp" in config["ExposedPorts"]

    # Alias -> tag at the same digest, via the registry, no rebuild.
    mlflow_client.set_registered_model_alias(model_name, "champion", version)
    alias_job = wait_for_job(service, alias_of(model_name, "champion"), timeout=120)
    assert alias_job["state"] == "succeeded", alias_job
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        path = repository.split("/", 1)[1]
        assert client.manifest_digest(path, "champion") == job["digest"]

    # Results are written back to the version in MLflow.
    tags = wait_for_tags(mlflow_client, model_name, version, "mlflow_dock.image")
    assert tags["mlflow_dock.image"] == f"{repository}@{job['digest']}"
    assert tags["mlflow_dock.status"] == "succeeded"
    tags = wait_for_tags(mlflow_client, model_name, version, "mlflow_dock.alias.champion")
    assert tags["mlflow_dock.alias.champion"] == f"{repository}:champion"

    # Replays and second events for the same version build nothing new.
    payload = created_payload(model_name, version)
    delivery = str(uuid.uuid4())
    first = signed_delivery(service, service_factory.secret, payload, delivery)
    replay = signed_delivery(service, service_factory.secret, payload, delivery)
    other = signed_delivery(service, service_factory.secret, payload, str(uuid.uuid4()))
    assert first.status_code == replay.status_code == other.status_code == 202
    assert first.json()["job_id"] == replay.json()["job_id"] == other.json()["job_id"] == job["id"]
    builds = [
        j
        for j in web.get(f"{service.url}/builds", params={"model": model_name}).json()
        if j["kind"] == "build"
    ]
    assert len(builds) == 1 and builds[0]["attempts"] == 1

    # A second version with the same requirements: timed for the record, checked for behaviour.
    second = log_sklearn_model(mlflow_server.url, model_name)
    job2 = wait_for_job(service, build_of(model_name, second))
    assert job2["state"] == "succeeded", job2
    # Identical requirements: the second version shares every layer but the model's.
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        layers1 = [
            d["digest"] for d in json.loads(client.get_manifest(path, version).body)["layers"]
        ]
        layers2 = [
            d["digest"] for d in json.loads(client.get_manifest(path, second).body)["layers"]
        ]
    assert layers1[:-1] == layers2[:-1] and layers1[-1] != layers2[-1]
    detail2 = web.get(f"{service.url}/builds/{job2['id']}", params={"log_lines": 500}).json()
    assert any("assembled" in line for line in detail2["log_tail"])
    assert predict(docker_client, f"{repository}:{second}", registry) == [0, 2]

    # Moving the alias moves the tag; deleting it is recorded (Distribution 2.8 cannot delete
    # a tag without deleting the manifest, so the tag stays and the job says why).
    mlflow_client.set_registered_model_alias(model_name, "champion", second)
    moved = wait_for_job(
        service,
        lambda j: alias_of(model_name, "champion")(j) and j["version"] == second,
        timeout=120,
    )
    assert moved["state"] == "succeeded"
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        assert client.manifest_digest(path, "champion") == job2["digest"]
    mlflow_client.delete_registered_model_alias(model_name, "champion")
    removed = wait_for_job(
        service, lambda j: j["kind"] == "unalias" and j["model_name"] == model_name, timeout=120
    )
    assert removed["state"] == "succeeded" and removed["version"] == second
    detail = web.get(f"{service.url}/builds/{removed['id']}").json()
    assert any("left in place" in line for line in detail["log_tail"])
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        assert client.manifest_digest(path, second) == job2["digest"]

    print(
        "\nTIMING model_version.created -> image pushed: "
        f"first version {created_to_pushed(mlflow_client, job):.1f} s, "
        f"second version {created_to_pushed(mlflow_client, job2):.1f} s"
    )


def test_killed_mid_build_resumes_after_restart(
    service_factory, webhook_factory, mlflow_server, model_name, docker_client
):
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host")
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    time.sleep(2)
    version = log_sklearn_model(mlflow_server.url, model_name)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = web.get(f"{service.url}/builds", params={"model": model_name}).json()
        if jobs and jobs[0]["state"] == "running":
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"build never started: {jobs}")
    killed_pid = service.pid
    service.kill()

    service.start()
    job = wait_for_job(service, build_of(model_name, version))
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    detail = web.get(f"{service.url}/builds/{job['id']}", params={"log_lines": 500}).json()
    # The killed process's lease ran out, so the restarted one took the job over (leases,
    # not "requeue everything at start": see README, Scaling out).
    assert any("expired; queued again" in line for line in detail["log_tail"])
    # A smoke-test container the killed process left behind is cleaned up on restart (and
    # only that: other processes' smoke containers on the same engine are theirs).
    owned = f"{OWNER_LABEL}={owner_of(killed_pid)}"
    assert docker_client.containers.list(all=True, filters={"label": owned}) == []


def test_unknown_model_version_fails_at_once_with_a_reason(service_factory):
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host")
    payload = created_payload("No Such Model", "1")
    response = signed_delivery(service, service_factory.secret, payload, str(uuid.uuid4()))
    assert response.status_code == 202
    job = wait_for_job(service, build_of("No Such Model", "1"), timeout=60)
    assert job["state"] == "failed" and job["attempts"] == 1
    assert "No Such Model" in job["error"]


def test_versions_registered_while_down_are_built_on_start(
    service_factory, mlflow_server, mlflow_client, model_name
):
    """No webhook at all: reconciliation alone must find the version."""
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host", MLFLOW_DOCK_SMOKE_TEST="false")
    service.stop()  # the store now remembers when it started watching
    version = log_sklearn_model(mlflow_server.url, model_name)
    mlflow_client.set_registered_model_alias(model_name, "prod", version)
    service.start()
    job = wait_for_job(service, build_of(model_name, version))
    assert job["state"] == "succeeded", job
    alias_job = wait_for_job(service, alias_of(model_name, "prod"), timeout=120)
    assert alias_job["state"] == "succeeded" and alias_job["digest"] == job["digest"]


def test_backfill_builds_versions_that_have_no_image(service_factory, mlflow_server, model_name):
    """`mlflow-dock backfill --wait` against the real MLflow server, registry and engine."""
    version = log_sklearn_model(mlflow_server.url, model_name)
    env = service_factory.env(MLFLOW_DOCK_BUILD_NETWORK="host", MLFLOW_DOCK_SMOKE_TEST="false")
    command = [sys.executable, "-m", "mlflow_dock", "backfill", "--model", model_name, "--wait"]
    result = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued 1 job(s)" in result.stdout
    assert f"ok      {model_name} {version}: " in result.stdout
    again = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "queued 0 job(s)" in again.stdout
