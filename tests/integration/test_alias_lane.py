"""Aliases never wait behind builds: the alias lane against real parts.

MLflow's own webhooks, the session's authenticated registry and `mlflow-dock serve` with the
default single build slot (`MLFLOW_DOCK_BUILD_CONCURRENCY=1`). One model, built once, serves
both checks, to keep the suite short: an alias set while other versions build is tagged before
they are, and an alias job whose process is killed mid-tag is finished after a restart.
Speed is measured by bench/alias_latency.py; these tests check order and outcome only.

The service reaches MLflow through a proxy that answers each build's download-URI request
`BUILD_HOLD` seconds late: every build then runs at least that long (assemblies of this small
model otherwise take about a second, too close to an alias's delivery to order reliably),
and the alias jobs, which never ask MLflow for anything, are not slowed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support import web
from support.jobs import alias_of, build_of, job_detail, wait_for_job
from support.servers import log_sklearn_model, register_model_version
from support.slowproxy import SlowProxy, slow_proxy

LANES = {
    # Short leases: the killed process's alias job is taken over within seconds.
    "MLFLOW_DOCK_LEASE_SECONDS": "3",
    "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
    "MLFLOW_DOCK_BUILD_NETWORK": "host",
    # Every version after the first is assembled in the registry; no container per version.
    "MLFLOW_DOCK_SMOKE_TEST": "false",
}
QUEUED_BUILDS = 3
BUILD_HOLD = 4.0


def jobs_of(service: Any, model: str) -> list[dict[str, Any]]:
    response = web.get(f"{service.url}/builds", params={"model": model, "limit": 100}, timeout=10)
    response.raise_for_status()
    jobs: list[dict[str, Any]] = response.json()
    return jobs


def at(job: dict[str, Any], key: str) -> datetime:
    value = job[key]
    assert value, (key, job)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def wait_until(predicate: Any, what: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture
def slow_mlflow(mlflow_server) -> Iterator[SlowProxy]:
    with slow_proxy(mlflow_server.url, slow_paths=("get-download-uri",), delay=BUILD_HOLD) as p:
        yield p


def test_an_alias_is_tagged_before_the_builds_ahead_of_it_and_survives_a_kill(
    service_factory,
    webhook_factory,
    slow_mlflow,
    mlflow_server,
    mlflow_client,
    registry,
    model_name,
):
    service = service_factory(MLFLOW_TRACKING_URI=slow_mlflow.url, **LANES)
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    first = log_sklearn_model(mlflow_server.url, model_name)
    built = wait_for_job(service, build_of(model_name, first))
    assert built["state"] == "succeeded", built

    # Several versions to build: one runs on the only build slot, the others wait for it.
    versions = [
        register_model_version(
            mlflow_server.url, model_name, from_model=model_name, from_version=first
        )
        for _ in range(QUEUED_BUILDS)
    ]
    running = wait_until(
        lambda: next(
            (
                j
                for j in jobs_of(service, model_name)
                if j["kind"] == "build" and j["state"] == "running"
            ),
            None,
        ),
        "no build started",
    )
    assert running["version"] in versions
    mlflow_client.set_registered_model_alias(model_name, "champion", first)
    alias = wait_for_job(service, alias_of(model_name, "champion"), timeout=120)
    assert alias["state"] == "succeeded", alias
    assert alias["digest"] == built["digest"]

    builds = {
        j["version"]: j for j in (wait_for_job(service, build_of(model_name, v)) for v in versions)
    }
    assert all(j["state"] == "succeeded" for j in builds.values()), builds
    tagged = at(alias, "finished_at")
    # Tagged while the build that held the slot when the alias was set still ran ...
    assert at(builds[running["version"]], "finished_at") > tagged
    # ... and ahead of every build that was waiting behind it, though they all arrived first.
    waiting = [j for v, j in builds.items() if v != running["version"]]
    assert waiting and all(at(j, "created_at") < at(alias, "created_at") for j in waiting)
    assert all(at(j, "finished_at") > tagged for j in waiting)
    assert len(slow_mlflow.held) == 1 + QUEUED_BUILDS  # every build was held
    took = (tagged - at(alias, "created_at")).total_seconds()
    ahead = (at(builds[running["version"]], "finished_at") - tagged).total_seconds()
    last = max((at(j, "finished_at") - tagged).total_seconds() for j in waiting)
    print(
        f"\nTIMING alias stored -> tagged {took:.2f} s; the running build finished {ahead:.1f} s "
        f"later, the last waiting one {last:.1f} s later"
    )

    path = naming.repository_name(model_name)
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        assert client.manifest_digest(path, naming.alias_tag("champion")) == built["digest"]

        # kill -9 while an alias job holds its lease: the registry is frozen, so the job is
        # claimed and stuck in its first request when the process dies.
        registry_pid = registry._proc.pid  # the session's registry; resumed in `finally`
        os.killpg(registry_pid, signal.SIGSTOP)
        try:
            mlflow_client.set_registered_model_alias(model_name, "prod", first)
            in_flight = wait_until(
                lambda: next(
                    (
                        j
                        for j in jobs_of(service, model_name)
                        if j["kind"] == "alias" and j["alias"] == "prod" and j["state"] == "running"
                    ),
                    None,
                ),
                "the prod alias job was never claimed",
                timeout=60,
            )
            service.kill()
        finally:
            os.killpg(registry_pid, signal.SIGCONT)
        assert client.manifest_digest(path, naming.alias_tag("prod")) is None

        service.start()
        done = wait_for_job(service, alias_of(model_name, "prod"), timeout=120)
        assert done["id"] == in_flight["id"] and done["state"] == "succeeded", done
        # The killed attempt and the one that finished; the lease ran out, nothing was lost.
        assert done["attempts"] == 2
        lines = job_detail(service, done["id"])["log_tail"]
        assert any("expired; queued again" in line for line in lines), lines
        assert client.manifest_digest(path, naming.alias_tag("prod")) == built["digest"]
