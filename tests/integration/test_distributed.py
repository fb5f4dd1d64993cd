"""Celery executor on PostgreSQL + Redis with several replicas and workers, and its failures.

Real parts only: `mlflow-dock serve` replicas and `mlflow-dock worker` processes, a private
PostgreSQL cluster and Redis server (private because the tests stop and restart them), the
session's registry and MLflow server. Leases are 3 s so lost workers are noticed quickly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support.cluster import (
    PostgresServer,
    RedisServer,
    WorkerProcess,
    start_postgres,
    start_redis,
    start_worker,
)
from support.jobs import created_payload, signed_delivery
from support.servers import log_sklearn_model, log_tail, register_model_version

LEASE = "3"


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.destroy()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


class Cluster:
    """Replicas and workers sharing one store, broker and data directory."""

    def __init__(self, factory: Any, postgres: PostgresServer, redis: RedisServer, tmp: Path):
        self.factory = factory
        self.tmp = tmp
        self.overrides = {
            "MLFLOW_DOCK_EXECUTOR": "celery",
            "MLFLOW_DOCK_BROKER_URL": redis.url,
            "MLFLOW_DOCK_DATABASE_URL": postgres.url,
            "MLFLOW_DOCK_DATA_DIR": str(tmp / "shared-data"),
            "MLFLOW_DOCK_LEASE_SECONDS": LEASE,
            "MLFLOW_DOCK_REDELIVER_SECONDS": "10",
            "MLFLOW_DOCK_RETRY_BACKOFF_SECONDS": "1",
            "MLFLOW_DOCK_MAX_BACKOFF_SECONDS": "5",
            "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
            "MLFLOW_DOCK_BUILD_NETWORK": "host",
            # Builds after the first are registry assemblies; a smoke test per version would
            # only measure the container runtime here.
            "MLFLOW_DOCK_SMOKE_TEST": "false",
        }
        self.workers: list[WorkerProcess] = []

    def replica(self) -> Any:
        return self.factory(**self.overrides)

    def worker(self) -> WorkerProcess:
        env = self.factory.env(self.tmp / "workers", **self.overrides)
        worker = start_worker(env, self.tmp / "workers")
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, service_factory, postgres, redis, tmp_path
) -> Iterator[Cluster]:
    c = Cluster(service_factory, postgres, redis, tmp_path)
    yield c
    c.stop()
    report = getattr(request.node, "_report_call", None)
    if report is not None and report.failed:
        for worker in c.workers:
            print(f"----- {worker.log_path} -----\n{log_tail(worker.log_path, 150)}")


def deliver(replica: Any, secret: str, model: str, version: str, delivery: str) -> httpx.Response:
    response = signed_delivery(replica, secret, created_payload(model, version), delivery)
    assert response.status_code == 202, response.text
    return response


def builds(replica: Any, model: str) -> list[dict[str, Any]]:
    jobs = httpx.get(f"{replica.url}/builds", params={"model": model, "limit": 500}, timeout=10)
    return [j for j in jobs.json() if j["kind"] == "build"]


def wait_all_succeeded(
    replica: Any, model: str, count: int, timeout: float = 600
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            jobs = builds(replica, model)
        except httpx.HTTPError:
            jobs = []
        if len(jobs) >= count and all(j["state"] == "succeeded" for j in jobs):
            return jobs
        assert not any(j["state"] == "failed" for j in jobs), jobs
        time.sleep(1)
    raise AssertionError(f"not all {count} builds succeeded in {timeout} s: {jobs}")


def register(mlflow_url: str, model: str, count: int) -> list[str]:
    """`count` versions of `model`: one logged, the rest registered from its artifacts."""
    first = log_sklearn_model(mlflow_url, model)
    return [first] + [
        register_model_version(mlflow_url, model, from_model=model, from_version=first)
        for _ in range(count - 1)
    ]


def assert_built_once(replica: Any, registry: Any, model: str, versions: list[str]) -> None:
    jobs = builds(replica, model)
    assert sorted(j["version"] for j in jobs) == sorted(versions)  # exactly one job each
    path = naming.repository_name(model)
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        for job in jobs:
            # The registry holds the digest the store recorded: published once, never moved.
            assert client.manifest_digest(path, naming.version_tag(job["version"])) == job["digest"]


def test_two_replicas_two_workers_build_each_version_once(cluster, mlflow_server, registry):
    """N = 6: enough for both workers and both replicas to race on every version (each
    delivery goes to both replicas, a retried delivery and a second webhook), small enough for
    CI: after the first version, builds are registry assemblies of a few seconds."""
    replicas = [cluster.replica(), cluster.replica()]
    cluster.worker()
    cluster.worker()
    model = f"dist-{uuid.uuid4().hex[:8]}"
    versions = register(mlflow_server.url, model, 6)
    secret = cluster.factory.secret
    for version in versions:
        delivery = str(uuid.uuid4())
        deliver(replicas[0], secret, model, version, delivery)
        deliver(replicas[1], secret, model, version, delivery)  # MLflow retrying elsewhere
        deliver(replicas[1], secret, model, version, str(uuid.uuid4()))  # a second webhook
    jobs = wait_all_succeeded(replicas[1], model, len(versions))
    assert len(jobs) == len(versions)
    # Each job ran once: one attempt, one claim, in the store's own account.
    assert all(j["attempts"] == 1 for j in jobs), jobs
    assert_built_once(replicas[0], registry, model, versions)


def wait_running(replica: Any, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{replica.url}/builds/{job_id}", timeout=10).json()["state"]
        if state == "running":
            return
        assert state == "queued", state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never started")


def test_killed_worker_and_killed_replica(cluster, mlflow_server, registry):
    """kill -9 of the worker mid-build: the job completes on another worker once the lease
    expires, published once. kill -9 of one replica: the other keeps accepting (and takes over
    the leader's sweeping, which is what requeues the dead worker's job)."""
    replicas = [cluster.replica(), cluster.replica()]
    first_worker = cluster.worker()
    model = f"kill-{uuid.uuid4().hex[:8]}"
    versions = register(mlflow_server.url, model, 2)
    secret = cluster.factory.secret
    job_id = deliver(replicas[0], secret, model, versions[0], str(uuid.uuid4())).json()["job_id"]
    wait_running(replicas[1], job_id)
    first_worker.kill()
    replicas[0].kill()
    cluster.worker()
    deliver(replicas[1], secret, model, versions[1], str(uuid.uuid4()))
    jobs = wait_all_succeeded(replicas[1], model, 2)
    taken_over = next(j for j in jobs if j["id"] == job_id)
    assert taken_over["attempts"] == 2  # the killed attempt and the one that finished
    detail = httpx.get(f"{replicas[1].url}/builds/{job_id}", params={"log_lines": 500}).json()
    assert any("expired" in line for line in detail["log_tail"]), detail["log_tail"]
    assert_built_once(replicas[1], registry, model, versions)


def test_broker_restart_and_database_outage_lose_nothing(
    cluster, mlflow_server, registry, postgres, redis
):
    """Redis restarted mid-run (its queue is not persisted: messages are lost) and PostgreSQL
    stopped for 20 s while builds run: every job still succeeds once, the workers survive."""
    replica = cluster.replica()
    workers = [cluster.worker(), cluster.worker()]
    model = f"outage-{uuid.uuid4().hex[:8]}"
    versions = register(mlflow_server.url, model, 4)
    secret = cluster.factory.secret
    for version in versions[:3]:
        deliver(replica, secret, model, version, str(uuid.uuid4()))
    redis.restart()
    time.sleep(2)
    postgres.stop()
    time.sleep(20)
    postgres.start()
    deliver(replica, secret, model, versions[3], str(uuid.uuid4()))
    wait_all_succeeded(replica, model, len(versions))
    assert all(worker.running for worker in workers)
    assert_built_once(replica, registry, model, versions)
    # Still working afterwards: one more version goes through.
    more = register_model_version(mlflow_server.url, model, from_model=model, from_version="1")
    deliver(replica, secret, model, more, str(uuid.uuid4()))
    wait_all_succeeded(replica, model, len(versions) + 1)
