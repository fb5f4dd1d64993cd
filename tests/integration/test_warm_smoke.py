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

import pytest

from mlflow_dock.build.engine import DockerEngine
from mlflow_dock.build.smoke import SmokeTester
from mlflow_dock.build.warm import WARM_LABEL, WarmSmoke
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


def test_versions_on_a_tested_runtime_are_smoke_tested_warm(
    service_factory, webhook_factory, mlflow_server, docker_client, model_name
):
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host")
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    first = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_for_job(service, build_of(model_name, first))
    assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]

    seconds = []
    for _ in range(2):
        version = register_model_version(
            mlflow_server.url, model_name, from_model=model_name, from_version=first
        )
        job = wait_for_job(service, build_of(model_name, version))
        assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]
        seconds.append(_warm_seconds(service, job))
    # The second check reuses the warm runtime: no container start, no imports.
    assert seconds[1] < 3.0, seconds

    warm = docker_client.containers.list(filters={"label": WARM_LABEL})
    mine = [
        c
        for c in warm
        if c.labels.get("io.mlflow-dock.smoke-owner", "").endswith(f":{service.pid}")
    ]
    assert len(mine) == 1
    attrs = mine[0].attrs["HostConfig"]
    assert attrs["NetworkMode"] == "none" and attrs["PidsLimit"] and attrs["Memory"]
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


def test_smoke_tests_run_on_podman_too(
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
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host", MLFLOW_DOCK_SMOKE_TEST="false")
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    version = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_for_job(service, build_of(model_name, version))
    assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]
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
    SmokeTester(podman_engine, network_mode="host").check(job["image"], example, lines.append)
    assert "smoke test passed" in lines

    warm = WarmSmoke(podman_engine)
    try:
        for _ in range(2):
            warm.check("runtime", job["image"], model_dir, example, lines.append)
        seconds = [float(m.group(1)) for line in lines if (m := _WARM_PASSED.search(line))]
        assert len(seconds) == 2 and seconds[1] < 3.0, lines
    finally:
        warm.close()
    left = podman_engine.client.containers.list(all=True, filters={"label": WARM_LABEL})
    assert not left
