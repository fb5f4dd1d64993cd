"""Celery executor on PostgreSQL + Redis with several replicas and workers, and its failures.

Real parts only: `mlflow-dock serve` replicas and `mlflow-dock worker` processes, a private
PostgreSQL cluster and Redis server (private because the tests stop and restart them), the
session's registry and MLflow server. Leases are 3 s so lost workers are noticed quickly.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support import web
from support.cluster import (
    PostgresServer,
    RedisServer,
    WorkerProcess,
    start_postgres,
    start_redis,
    start_worker,
)
from support.jobs import alias_of, created_payload, signed_delivery, wait_for_job
from support.servers import log_sklearn_model, log_tail, register_model_version, start_service

LEASE = "3"
VERSIONS = 100


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
    """Replicas and workers sharing one store and broker, and nothing on disk.

    Each process has its own data directory, as on separate machines: build logs, runtime
    locks and published digests must travel through the store, not a shared folder."""

    def __init__(self, factory: Any, postgres: PostgresServer, redis: RedisServer, tmp: Path):
        self.factory = factory
        self.tmp = tmp
        self.overrides = {
            "MLFLOW_DOCK_EXECUTOR": "celery",
            "MLFLOW_DOCK_BROKER_URL": redis.url,
            "MLFLOW_DOCK_DATABASE_URL": postgres.url,
            "MLFLOW_DOCK_LEASE_SECONDS": LEASE,
            "MLFLOW_DOCK_REDELIVER_SECONDS": "10",
            "MLFLOW_DOCK_RETRY_BACKOFF_SECONDS": "1",
            "MLFLOW_DOCK_MAX_BACKOFF_SECONDS": "5",
            "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
            "MLFLOW_DOCK_BUILD_NETWORK": "host",
            # Builds after the first are registry assemblies; a smoke test per version (a
            # container per version, 100 of them in the delivery test) would measure the
            # container runtime, not distribution. Smoke tests have their own tests.
            "MLFLOW_DOCK_SMOKE_TEST": "false",
        }
        self.workers: list[WorkerProcess] = []

    def replica(self) -> Any:
        return self.factory(**self.overrides)

    def worker(self) -> WorkerProcess:
        workdir = self.tmp / f"worker-{uuid.uuid4().hex[:6]}"
        env = self.factory.env(workdir, **self.overrides)
        worker = start_worker(env, workdir)
        self.workers.append(worker)  # list.append is atomic: start() calls this from threads
        return worker

    def start(self, replicas: int, workers: int) -> list[Any]:
        """Start replicas and workers all at once: each takes seconds to import and connect,
        which in sequence is most of a short test's wall time."""
        envs = [
            self.factory.env(self.tmp / f"replica-{i}", **self.overrides) for i in range(replicas)
        ]
        assert len({env["PORT"] for env in envs}) == replicas  # free_port() may repeat itself
        with ThreadPoolExecutor(max_workers=replicas + workers) as pool:
            starting = [
                pool.submit(start_service, env, self.tmp / f"replica-{i}")
                for i, env in enumerate(envs)
            ]
            launching = [pool.submit(self.worker) for _ in range(workers)]
            started = []
            for future in starting:
                started.append(future.result())
                # The factory stops them and prints their logs if the test fails.
                self.factory.services.append(started[-1])
            for future in launching:
                future.result()
        return started

    def stop(self) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(self.workers))) as pool:
            list(pool.map(WorkerProcess.stop, self.workers))


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
    jobs = web.get(f"{replica.url}/builds", params={"model": model, "limit": 500}, timeout=10)
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


def manifest_puts_by_tag(registry: Any, model: str) -> Counter[str]:
    """Successful manifest PUTs under a tag of `model`'s repository, from the registry's log."""
    uri = re.compile(
        rf"http\.request\.method=PUT .*http\.request\.uri=\"?/v2/"
        rf"{re.escape(naming.repository_name(model))}/manifests/([^\s\"]+)"
    )
    puts: Counter[str] = Counter()
    for line in registry.log_path.read_text(errors="replace").splitlines():
        if "response completed" not in line or "http.response.status=201" not in line:
            continue
        match = uri.search(line)
        # By digest ("sha256:...") or a supply-chain artifact's tag ("sha256-....sbom"): not
        # a version tag.
        if match and not match.group(1).startswith("sha256"):
            puts[match.group(1)] += 1
    return puts


def delivery_ids(postgres: PostgresServer) -> int:
    engine = sqlalchemy.create_engine(postgres.url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(sqlalchemy.text("SELECT count(*) FROM deliveries")).one()[0]
            )
    finally:
        engine.dispose()


def test_100_versions_delivered_to_both_replicas_by_mlflow_are_built_once(
    cluster, mlflow_server, mlflow_client, webhook_factory, registry, postgres
):
    """Two replicas, two workers, 100 versions: MLflow itself sends every `created` event to
    both replicas (one webhook per replica URL), 200 deliveries. Exactly 100 jobs, each run
    once, each version tag written once in the registry.

    All 100 are created at once: the first job to claim one builds the model's runtime, and
    the others wait for that build (a deployment-wide runtime lock) and then assemble on its
    image in the registry. One build, 99 assemblies, whichever worker runs which.
    """
    # Two build processes per worker: an assembly is mostly waiting on MLflow and the registry.
    cluster.overrides["MLFLOW_DOCK_BUILD_CONCURRENCY"] = "2"
    model = f"dist-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Logged under another name while the cluster starts, before any webhook exists: the
        # test's versions are registered from its artifacts, and every one of them is delivered.
        logging_source = pool.submit(log_sklearn_model, mlflow_server.url, f"{model}-source")
        replicas = cluster.start(replicas=2, workers=2)
        source = mlflow_client.get_model_version(f"{model}-source", logging_source.result())
    for replica in replicas:
        webhook_factory(
            f"{replica.url}/webhook", cluster.factory.secret, events=("model_version.created",)
        )
    assert source.source
    model_id = source.model_id or source.source.rsplit("/", 1)[-1]
    mlflow_client.create_registered_model(model)

    def create_version() -> str:
        created = mlflow_client.create_model_version(
            model, source=source.source, run_id=source.run_id, model_id=model_id
        )
        return str(created.version)

    versions = [create_version() for _ in range(VERSIONS)]
    jobs = wait_all_succeeded(replicas[1], model, VERSIONS, timeout=400)
    assert len(jobs) == VERSIONS
    # The runtime was built once; every other version was assembled on an earlier image.
    logs = [
        web.get(f"{replicas[0].url}/builds/{j['id']}", params={"log_lines": 500}).json()["log_tail"]
        for j in jobs
    ]
    assembled = [log for log in logs if any("in the registry on top of" in line for line in log)]
    assert len(assembled) == VERSIONS - 1, [log for log in logs if log not in assembled][:2]
    # Every delivery arrived (MLflow retries a failed one under the same id)...
    assert delivery_ids(postgres) == 2 * VERSIONS
    # ... and each job ran once: one attempt, one claim, in the store's own account ...
    assert all(j["attempts"] == 1 for j in jobs), [j for j in jobs if j["attempts"] != 1]
    assert_built_once(replicas[0], registry, model, versions)
    # ... and in the registry's: one manifest PUT per version tag.
    puts = manifest_puts_by_tag(registry, model)
    assert puts == Counter({naming.version_tag(v): 1 for v in versions}), puts


def wait_running(replica: Any, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = web.get(f"{replica.url}/builds/{job_id}", timeout=10).json()["state"]
        if state == "running":
            return
        assert state == "queued", state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never started")


def test_killed_worker_and_killed_replica(cluster, mlflow_server, registry):
    """kill -9 of the worker mid-build: the job completes on another worker once the lease
    expires, published once. kill -9 of one replica: the other keeps accepting (and takes over
    the leader's sweeping, which is what requeues the dead worker's job). An alias is tagged by
    the surviving replica's alias lane: alias jobs never go through the broker."""
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
    detail = web.get(f"{replicas[1].url}/builds/{job_id}", params={"log_lines": 500}).json()
    assert any("expired" in line for line in detail["log_tail"]), detail["log_tail"]
    # Written by the workers, read by a replica that shares no disk with them.
    assert any("published" in line for line in detail["log_tail"]), detail["log_tail"]
    assert_built_once(replicas[1], registry, model, versions)
    alias = {"entity": "model_version_alias", "action": "created"}
    alias["data"] = {"name": model, "alias": "prod", "version": versions[0]}
    response = signed_delivery(replicas[1], secret, alias)
    assert response.status_code == 202, response.text
    alias_job = wait_for_job(replicas[1], alias_of(model, "prod"), timeout=60)
    assert alias_job["state"] == "succeeded" and alias_job["digest"] == taken_over["digest"]


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
