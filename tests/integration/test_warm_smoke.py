"""Warm smoke tests against a real engine: a version assembled on an already-tested runtime is
checked in a warm container of that runtime, in about a second once it is warm."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from mlflow_dock.imaging.engine import DockerEngine
from mlflow_dock.imaging.smoke import SmokeLimits, SmokeTester
from mlflow_dock.imaging.warm import WARM_LABEL
from mlflow_dock.mlflow.client import MlflowSource
from support.jobs import build_of, job_detail, wait_for_job
from support.servers import log_sklearn_model, register_model_version

pytestmark = pytest.mark.integration

_WARM_PASSED = re.compile(r"smoke test passed in a warm runtime \((\d+\.\d+)s\)")


def _warm_seconds(service, job) -> float:
    lines = job_detail(service, job["id"])["log_tail"]
    found = [float(m.group(1)) for line in lines if (m := _WARM_PASSED.search(line))]
    assert found, lines
    return found[-1]


def _registered_to_published(mlflow_client, job) -> float:
    """Seconds from MLflow's creation of the version to the job's finish (same machine clock)."""
    version = mlflow_client.get_model_version(job["model_name"], job["version"])
    finished = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")).timestamp()
    return finished - version.creation_timestamp / 1000


def test_versions_on_a_tested_runtime_are_smoke_tested_warm(
    service_factory, webhook_factory, mlflow_server, mlflow_client, docker_client, model_name
):
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host")
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    first = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_for_job(service, build_of(model_name, first))
    assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]

    seconds, end_to_end = [], []
    for _ in range(2):
        version = register_model_version(
            mlflow_server.url, model_name, from_model=model_name, from_version=first
        )
        job = wait_for_job(service, build_of(model_name, version))
        assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]
        seconds.append(_warm_seconds(service, job))
        end_to_end.append(_registered_to_published(mlflow_client, job))
    print(f"warm checks {seconds} s; registration to published {end_to_end} s")
    # The second check reuses the warm runtime: no container start (speed: bench/, not here).
    last = job_detail(service, job["id"])["log_tail"]
    assert not any("starting a warm runtime" in line for line in last), last

    warm = docker_client.containers.list(filters={"label": WARM_LABEL})
    mine = [
        c
        for c in warm
        if c.labels.get("io.mlflow-dock.smoke-owner", "").endswith(f":{service.pid}")
    ]
    assert len(mine) == 1
    attrs = mine[0].attrs["HostConfig"]
    assert attrs["NetworkMode"] == "none" and attrs["PidsLimit"] and attrs["Memory"]
    assert attrs["ReadonlyRootfs"] is True and attrs["CapDrop"] == ["ALL"]
    assert mine[0].attrs["Config"]["User"] == "10001:10001"
    assert "MLFLOW_WEBHOOK_SECRET" not in " ".join(mine[0].attrs["Config"]["Env"])
    service.stop()
    time.sleep(1)
    assert not [c for c in docker_client.containers.list(all=True) if c.id == mine[0].id]


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> Iterator[tuple[DockerEngine, dict[str, str]]]:
    """A Podman API service (Docker-compatible) on a private socket, for the same SDK calls."""
    if shutil.which("podman") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("podman is not installed (CI=true; run `bash .ci/run`)")
        pytest.skip("podman is not installed")
    workdir = tmp_path_factory.mktemp("podman")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    conf = workdir / "containers.conf"
    # Podman's default ulimits (1048576) exceed what this machine lets a container have.
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={min(nofile, 65536)}:{min(nofile, 65536)}", '
        f'"nproc={min(nproc, 4096)}:{min(nproc, 4096)}"]\n'
    )
    socket_path = workdir / "podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "podman.log").open("wb"),
    )
    engine = DockerEngine(base_url=f"unix://{socket_path}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                engine.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield engine, env
    finally:
        engine.close()
        proc.terminate()
        proc.wait(timeout=30)


def _manifest(registry, image: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """The image manifest ``image`` (``host/repository:tag``, one platform) names."""
    repository, _, tag = image.partition("/")[2].rpartition(":")
    accept = "application/vnd.oci.image.manifest.v1+json"
    with httpx.Client(base_url=registry.url, auth=registry.auth, timeout=60) as client:
        answer = client.get(f"/v2/{repository}/manifests/{tag}", headers={"Accept": accept})
        return answer.raise_for_status().json()  # type: ignore[no-any-return]


def test_smoke_tests_and_zstd_images_run_on_podman_too(
    service_factory,
    webhook_factory,
    mlflow_server,
    mlflow_client,
    registry,
    podman,
    model_name,
    tmp_path,
):
    podman_engine, podman_env = podman
    # zstd package layers: Podman reads them (Docker 20.10, the suite's engine, cannot), so this
    # is also the suite's proof that a zstd image pulls and serves.
    service = service_factory(
        MLFLOW_DOCK_BUILD_NETWORK="host",
        MLFLOW_DOCK_SMOKE_TEST="false",
        MLFLOW_DOCK_LAYER_COMPRESSION="zstd",
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    version = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_for_job(service, build_of(model_name, version))
    assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]
    manifest = _manifest(registry, job["image"])
    assert any(layer["mediaType"].endswith("+zstd") for layer in manifest["layers"]), manifest
    # Setup: the image into Podman's store (a loopback registry over plain HTTP).
    subprocess.run(
        [
            "podman",
            "pull",
            "-q",
            "--tls-verify=false",
            "--creds",
            f"{registry.username}:{registry.password}",
            job["image"],
        ],
        env=podman_env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    model_dir = (
        MlflowSource(mlflow_server.url).download(model_name, version, tmp_path / "model").path
    )
    example = model_dir / "serving_input_example.json"
    lines: list[str] = []
    # The same confinement as on Docker: no network, read-only root, limits, no capabilities.
    SmokeTester(podman_engine, limits=SmokeLimits()).check(job["image"], example, lines.append)
    assert any(line.startswith("smoke test passed") for line in lines), lines

    # The warm smoke test is not run on Podman here: on this suite's loaded 2-core machine its
    # loader (MLflow and the model imported in one confined container) did not report ready
    # within 300 s under Podman 4.3, while it did within seconds when the machine was idle;
    # the cause was not found, and docs/builders.md says warm checks are tested on Docker only.
