"""The webhook intake of a real `mlflow-dock serve` fed by a real MLflow server's webhooks.

Accept-only (no workers): what is checked is that MLflow's own deliveries, signed by MLflow,
pass the plain ASGI receiver and the quick payload check and become the expected jobs.
"""

from __future__ import annotations

import time

from mlflow import MlflowClient
from support import web
from support.servers import MlflowServer, log_sklearn_model, register_model_version


def _jobs(url: str, model: str) -> list[dict]:
    response = web.get(f"{url}/builds", params={"model": model}, timeout=10)
    response.raise_for_status()
    return response.json()


def test_mlflow_deliveries_become_jobs_through_the_asgi_receiver(
    service_factory,
    mlflow_server: MlflowServer,
    mlflow_client: MlflowClient,
    webhook_factory,
    model_name: str,
) -> None:
    service = service_factory(
        MLFLOW_DOCK_BUILD_CONCURRENCY="0",
        MLFLOW_DOCK_ALIAS_CONCURRENCY="0",
        MLFLOW_DOCK_RECONCILE_INTERVAL="0",
        MLFLOW_DOCK_SMOKE_TEST="false",
        MLFLOW_DOCK_MLFLOW_WRITE_BACK="false",
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    first = log_sklearn_model(mlflow_server.url, model_name)
    second = register_model_version(
        mlflow_server.url, model_name, from_model=model_name, from_version=first
    )
    mlflow_client.set_registered_model_alias(model_name, "champion", second)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = _jobs(service.url, model_name)
        if len(jobs) >= 3:
            break
        time.sleep(0.2)
    found = sorted((j["kind"], j["version"], j["alias"], j["state"]) for j in jobs)
    assert found == [
        ("alias", second, "champion", "queued"),
        ("build", first, None, "queued"),
        ("build", second, None, "queued"),
    ]
    # Every delivery answered 202 (MLflow retries anything else, which would show here).
    metrics = web.get(f"{service.url}/metrics", timeout=10).text
    assert 'mlflow_dock_webhook_deliveries_total{outcome="202"} 3.0' in metrics, metrics
