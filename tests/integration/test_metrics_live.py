"""/metrics and JSON logs of a running service, moved by real deliveries and a real (failing) job.

No image is built: a version MLflow does not have fails at its first step, which is enough to
move the job, attempt and step series; the webhook outcomes come from real HTTP requests. A
second process on the same store shows that store-derived figures agree across replicas while
per-replica counters stay per replica.
"""

from __future__ import annotations

import json
import time
import uuid

from prometheus_client.parser import text_string_to_metric_families

from mlflow_dock.intake.signatures import sign
from support import web
from support.jobs import build_of, created_payload, signed_delivery, wait_for_job

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = web.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    return web.post(f"{url}/webhook", content=body, headers=headers, timeout=10).status_code


def test_metrics_and_json_logs_move_with_real_events(service_factory, tmp_path):
    model = f"No Such Model {uuid.uuid4().hex[:6]}"
    data_dir = tmp_path / "shared-data"
    common = {
        "MLFLOW_DOCK_DATA_DIR": str(data_dir),
        "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
        "MLFLOW_DOCK_SMOKE_TEST": "false",
        "MLFLOW_DOCK_LOG_FORMAT": "json",
    }
    service = service_factory(**common)
    before = scrape(service.url)
    assert metric(before, "mlflow_dock_store_up") == 1

    secret = service_factory.secret
    delivery = str(uuid.uuid4())
    payload = created_payload(model, "1")
    assert signed_delivery(service, secret, payload, delivery).status_code == 202
    assert signed_delivery(service, secret, payload, delivery).status_code == 202  # replay
    body = json.dumps(payload).encode()
    ts = str(int(time.time()))
    bad = {"X-MLflow-Delivery-Id": "d-bad", "X-MLflow-Timestamp": ts}
    assert post(service.url, body, {**bad, "X-MLflow-Signature": "v1,Zm9v"}) == 401
    assert post(service.url, body, {"X-MLflow-Delivery-Id": "d-no-ts"}) == 400
    junk = b'{"entity": "experiment", "action": "deleted", "data": {}}'
    signed = {**bad, "X-MLflow-Delivery-Id": "d-junk"}
    signed["X-MLflow-Signature"] = sign(secret, "d-junk", ts, junk)
    assert post(service.url, junk, signed) == 422
    assert post(service.url, b"x" * (1024 * 1024 + 1), bad) == 413

    job = wait_for_job(service, build_of(model, "1"), timeout=120)
    assert job["state"] == "failed"

    after = scrape(service.url)
    for outcome in ("202", "duplicate", "401", "400", "422", "413"):
        moved = metric(after, "mlflow_dock_webhook_deliveries_total", outcome=outcome) - metric(
            before, "mlflow_dock_webhook_deliveries_total", outcome=outcome
        )
        assert moved == 1, outcome
    assert metric(after, "mlflow_dock_jobs", kind="build", state="failed") == 1
    assert metric(after, "mlflow_dock_job_attempts_total", kind="build", outcome="failed") == 1
    assert metric(after, "mlflow_dock_step_duration_seconds_count", step="resolve") == 1
    assert metric(after, "mlflow_dock_queue_depth", lane="build") == 0

    # Another replica on the same store (as API replicas beside remote workers would be).
    replica = service_factory(**common)
    theirs = scrape(replica.url)
    for key in (
        ("mlflow_dock_jobs", (("kind", "build"), ("state", "failed"))),
        ("mlflow_dock_job_attempts_total", (("kind", "build"), ("outcome", "failed"))),
        ("mlflow_dock_step_duration_seconds_count", (("step", "resolve"),)),
    ):
        assert theirs[key] == after[key] == 1, key
    assert metric(theirs, "mlflow_dock_webhook_deliveries_total", outcome="202") == 0

    # JSON logs: one object per line; the job's lines carry its ids, model and version.
    lines = [json.loads(line) for line in service.log_text().splitlines() if line.startswith("{")]
    assert lines, service.log_text()[-2000:]
    assert all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)
    failed = [line for line in lines if line["message"].startswith(f"job {job['id']} failed")]
    assert failed, [line["message"] for line in lines]
    assert failed[0]["job_id"] == job["id"]
    assert failed[0]["delivery_id"] == delivery
    assert (failed[0]["model"], failed[0]["version"]) == (model, "1")
    accepted = [line for line in lines if line.get("delivery_id") == delivery]
    assert any(line["logger"] == "mlflow_dock.intake.accept" for line in accepted)
    assert secret not in service.log_text()
