"""Warm smoke tests against a real engine: a version assembled on an already-tested runtime is
checked in a warm container of that runtime, in about a second once it is warm."""

from __future__ import annotations

import re
import time

import pytest

from mlflow_dock.build.warm import WARM_LABEL
from support.jobs import build_of, job_detail, wait_for_job
from support.servers import log_sklearn_model, register_model_version

pytestmark = pytest.mark.integration

_WARM_PASSED = re.compile(r"smoke test passed in a warm \S+ \((\d+\.\d+)s\)")


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
