"""The Celery executor on RabbitMQ (`MLFLOW_DOCK_BROKER_URL=amqp://...`), as the README offers.

Redis is the broker the fault tests exercise at length (test_distributed.py); this proves the
other documented broker carries a real MLflow webhook's job from a `serve` replica to a
`mlflow-dock worker`, including a broker restart while the worker waits for work.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support.cluster import PostgresServer, start_postgres, start_worker
from support.jobs import build_of, wait_for_job
from support.rabbitmq import RabbitServer, start_rabbitmq
from support.servers import log_sklearn_model, register_model_version


@pytest.fixture
def rabbitmq() -> Iterator[RabbitServer]:
    server = start_rabbitmq()
    yield server
    server.destroy()


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.destroy()


def test_rabbitmq_broker_carries_real_webhook_jobs_to_a_worker(
    service_factory, webhook_factory, mlflow_server, registry, rabbitmq, postgres, tmp_path
):
    overrides = {
        "MLFLOW_DOCK_EXECUTOR": "celery",
        "MLFLOW_DOCK_BROKER_URL": rabbitmq.url,
        "MLFLOW_DOCK_DATABASE_URL": postgres.url,
        "MLFLOW_DOCK_DATA_DIR": str(tmp_path / "shared-data"),
        "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
        "MLFLOW_DOCK_REDELIVER_SECONDS": "10",
        "MLFLOW_DOCK_BUILD_NETWORK": "host",
        # The broker is under test here, not the image: the smoke test is covered elsewhere.
        "MLFLOW_DOCK_SMOKE_TEST": "false",
    }
    replica = service_factory(**overrides)
    worker = start_worker(service_factory.env(tmp_path / "worker", **overrides), tmp_path / "w")
    try:
        webhook_factory(f"{replica.url}/webhook", service_factory.secret)
        model = f"amqp-{uuid.uuid4().hex[:8]}"
        first = log_sklearn_model(mlflow_server.url, model)
        job = wait_for_job(replica, build_of(model, first))
        assert job["state"] == "succeeded", job

        # A broker restart loses nothing: the store is the truth and the sweeper re-sends.
        rabbitmq.stop()
        rabbitmq.start()
        second = register_model_version(
            mlflow_server.url, model, from_model=model, from_version=first
        )
        job2 = wait_for_job(replica, build_of(model, second), timeout=300)
        assert job2["state"] == "succeeded", job2
        assert worker.running

        with RegistryClient(
            registry.host, username=registry.username, password=registry.password
        ) as client:
            path = naming.repository_name(model)
            assert client.manifest_digest(path, naming.version_tag(first)) == job["digest"]
            assert client.manifest_digest(path, naming.version_tag(second)) == job2["digest"]
        assert "amqp://guest:guest@" not in worker.log_text()  # the broker URL is a secret
    finally:
        worker.stop()
