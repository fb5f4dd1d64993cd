"""Store-derived and per-replica metrics, scraped and parsed as Prometheus would."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mlflow_dock.jobs.steps import ATTEMPT_FAILED, ATTEMPT_RETRY, ATTEMPT_SUCCEEDED, StepRecorder
from mlflow_dock.observe.metrics import STEP_BUCKETS, ServiceMetrics
from mlflow_dock.store.facade import JobStore
from mlflow_dock.store.records import utcnow
from support.databases import database

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yaml"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> JobStore:
    """The figures are SQL aggregates: both databases the README supports must agree."""
    with database(request.param, tmp_path) as url:
        store = JobStore.from_url(url)
        yield store
        store.close()


def scrape(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def run_attempt(store, job, outcome, steps, blob_bytes=()):
    recorder = StepRecorder(store, job_id=job.id, attempt=1, kind=job.kind.value)
    for name in steps:
        recorder.enter(name)
    for kind, size in blob_bytes:
        recorder.count_blob(kind, size)
    recorder.finish(outcome)
    return recorder


def test_an_empty_store_reports_zeros_for_every_series(store):
    metrics = ServiceMetrics()
    metrics.watch_store(store)
    samples = scrape(metrics)
    assert value(samples, "mlflow_dock_store_up") == 1
    for lane in ("build", "alias"):
        assert value(samples, "mlflow_dock_queue_depth", lane=lane) == 0
        assert value(samples, "mlflow_dock_queue_oldest_age_seconds", lane=lane) == 0
    assert value(samples, "mlflow_dock_jobs", kind="build", state="queued") == 0
    assert value(samples, "mlflow_dock_job_attempts_total", kind="build", outcome="failed") == 0
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="401") == 0
    assert value(samples, "mlflow_dock_step_duration_seconds_count", step="push") == 0


def test_store_figures_follow_jobs_attempts_and_steps(store):
    metrics = ServiceMetrics()
    metrics.watch_store(store)
    ok, _ = store.request_build("m", "1")
    retried, _ = store.request_build("m", "2")
    failed, _ = store.request_build("m", "3")
    waiting, _ = store.request_build("m", "4")
    run_attempt(
        store,
        ok,
        ATTEMPT_SUCCEEDED,
        ["resolve", "assemble", "push"],
        blob_bytes=[("uploaded", 1000), ("present", 50), ("uploaded", 24)],
    )
    retry = run_attempt(store, retried, ATTEMPT_RETRY, ["resolve", "build", "push"])
    assert retry.failed_step == "push"
    run_attempt(store, failed, ATTEMPT_FAILED, ["resolve", "build", "smoke"])
    store.fail(failed.id, "smoke test failed")

    samples = scrape(metrics)
    assert value(samples, "mlflow_dock_jobs", kind="build", state="queued") == 3
    assert value(samples, "mlflow_dock_jobs", kind="build", state="failed") == 1
    assert value(samples, "mlflow_dock_queue_depth", lane="build") == 3
    assert value(samples, "mlflow_dock_queue_depth", lane="alias") == 0
    assert value(samples, "mlflow_dock_queue_oldest_age_seconds", lane="build") >= 0
    assert value(samples, "mlflow_dock_job_attempts_total", kind="build", outcome="succeeded") == 1
    assert value(samples, "mlflow_dock_job_attempts_total", kind="build", outcome="retry") == 1
    assert value(samples, "mlflow_dock_job_attempts_total", kind="build", outcome="failed") == 1
    assert value(samples, "mlflow_dock_job_retries_total", cause="push") == 1
    assert value(samples, "mlflow_dock_smoke_test_failures_total") == 1
    assert value(samples, "mlflow_dock_registry_blob_bytes_total", outcome="uploaded") == 1024
    assert value(samples, "mlflow_dock_registry_blob_bytes_total", outcome="present") == 50
    assert value(samples, "mlflow_dock_step_duration_seconds_count", step="resolve") == 3
    # Steps are fast here, so every one falls in the first bucket, and +Inf holds them all.
    first = str(float(STEP_BUCKETS[0]))
    assert value(samples, "mlflow_dock_step_duration_seconds_bucket", step="resolve", le=first) == 3
    assert (
        value(samples, "mlflow_dock_step_duration_seconds_bucket", step="resolve", le="+Inf") == 3
    )
    assert waiting.id  # still queued: counted in the depth above


def test_oldest_queued_age_starts_when_a_backoff_ends(store):
    job, _ = store.request_build("m", "1")
    figures = store.figures(bucket_bounds=STEP_BUCKETS, now=utcnow() + timedelta(minutes=10))
    assert 599 <= figures.oldest_queued_seconds["build"] <= 601
    assert figures.queue_depth == {"build": 1, "alias": 0}
    assert job.id


def test_an_alias_waits_in_its_lane_only_once_its_build_has_finished(store):
    build, _ = store.request_build("m", "1")
    alias, _ = store.request_alias("m", "1", "champion")
    later = utcnow() + timedelta(minutes=10)
    figures = store.figures(bucket_bounds=STEP_BUCKETS, now=later)
    assert figures.queue_depth == {"build": 1, "alias": 1}
    # Ten minutes behind its build is not ten minutes stuck in the alias lane.
    assert figures.oldest_queued_seconds["alias"] == 0
    store.claim(build.id, owner="w", lease_seconds=30)
    store.succeed(build.id, image="r/m:1", digest="sha256:" + "a" * 64, owner="w")
    figures = store.figures(bucket_bounds=STEP_BUCKETS, now=later)
    assert 599 <= figures.oldest_queued_seconds["alias"] <= 601
    assert figures.queue_depth == {"build": 0, "alias": 1}
    assert alias.id


def test_two_apps_on_one_store_report_the_same_truth(store):
    # As two replicas would: each has its own registry, both read the shared store.
    first, second = ServiceMetrics(), ServiceMetrics()
    first.watch_store(store)
    second.watch_store(store)
    job, _ = store.request_build("m", "1")
    run_attempt(store, job, ATTEMPT_SUCCEEDED, ["resolve", "push"])
    first.webhook_delivery("202")
    a, b = scrape(first), scrape(second)
    for key in (("mlflow_dock_job_attempts_total", (("kind", "build"), ("outcome", "succeeded"))),):
        assert a[key] == b[key] == 1
    # Per-replica counters stay per replica.
    assert value(a, "mlflow_dock_webhook_deliveries_total", outcome="202") == 1
    assert value(b, "mlflow_dock_webhook_deliveries_total", outcome="202") == 0


def test_an_unreadable_store_is_a_zero_not_a_failed_scrape():
    class Broken:
        def figures(self, *, bucket_bounds):
            raise OSError("database is locked")

    metrics = ServiceMetrics()
    metrics.watch_store(Broken())
    samples = scrape(metrics)
    assert value(samples, "mlflow_dock_store_up") == 0
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="202") == 0


def test_webhook_outcomes_and_reconciliation_catches_count():
    metrics = ServiceMetrics()
    for outcome in ("202", "202", "duplicate", "401", "weird"):
        metrics.webhook_delivery(outcome)
    metrics.reconciled("build")
    samples = scrape(metrics)
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="202") == 2
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="duplicate") == 1
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="401") == 1
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="500") == 1
    assert value(samples, "mlflow_dock_reconcile_queued_total", kind="build") == 1


def test_watching_again_replaces_the_store_collector(store, tmp_path):
    metrics = ServiceMetrics()
    metrics.watch_store(store)
    metrics.watch_store(store)  # a second lifespan start must not register twice
    assert value(scrape(metrics), "mlflow_dock_store_up") == 1


def test_alert_rules_parse_and_use_only_metrics_that_exist(store):
    rules = yaml.safe_load(ALERTS.read_text())
    metrics = ServiceMetrics()
    metrics.watch_store(store)
    exposed = {name for name, _labels in scrape(metrics)}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in alerts}
    assert {"MlflowDockQueueStuck", "MlflowDockBuildFailureRate"} <= names
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        used = set(re.findall(r"\bmlflow_dock_[a-z_]+\b", rule["expr"]))
        assert used, rule["alert"]
        missing = used - exposed
        assert not missing, f"{rule['alert']} uses metrics nobody exposes: {missing}"
        # Parentheses balance: a cheap guard against a broken expression.
        assert rule["expr"].count("(") == rule["expr"].count(")")
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_the_app_serves_metrics_and_counts_webhook_answers(tmp_path):
    """Wiring: /metrics on the real app, moved by deliveries the app answers."""
    import json
    import time

    from fastapi.testclient import TestClient

    from mlflow_dock.app import Components, Service, create_asgi_app
    from mlflow_dock.errors import PermanentError
    from mlflow_dock.intake.signatures import sign
    from mlflow_dock.settings import Settings

    settings = Settings(
        _env_file=None,
        webhook_secret="whsec-metrics",
        docker_username="u",
        docker_registry_password="p4ssword",
        docker_registry="127.0.0.1:5000",
        data_dir=tmp_path,
        mlflow_write_back=False,
        reconcile_interval_seconds=0,
        smoke_test=False,
    )
    components = Components(settings)

    class Refusing:  # the build itself is not what this test is about
        def run(self, job, log):
            raise PermanentError("not built in this test")

    components.runner = Refusing()  # type: ignore[assignment]
    app = create_asgi_app(settings, service=Service(components))
    body = json.dumps(
        {"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}}
    ).encode()
    ts = str(int(time.time()))
    signed = {
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign("whsec-metrics", "d-1", ts, body),
    }
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/webhook", content=body, headers=signed).status_code == 202
        assert client.post("/webhook", content=body, headers=signed).status_code == 202
        forged = {**signed, "X-MLflow-Signature": "v1,Zm9yZ2Vk"}
        assert client.post("/webhook", content=body, headers=forged).status_code == 401
        response = client.get("/metrics")
    assert response.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="202") == 1
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="duplicate") == 1
    assert value(samples, "mlflow_dock_webhook_deliveries_total", outcome="401") == 1
    assert (
        value(samples, "mlflow_dock_jobs", kind="build", state="queued")
        + value(samples, "mlflow_dock_jobs", kind="build", state="running")
        + value(samples, "mlflow_dock_jobs", kind="build", state="failed")
        == 1
    )


def test_registry_clients_made_during_a_job_count_its_transfers(store, tmp_path):
    """Wiring: Components.registry() hands the running job's recorder to the client."""
    from mlflow_dock.app import Components
    from mlflow_dock.settings import Settings

    settings = Settings(
        _env_file=None,
        webhook_secret="whsec-transfers",
        docker_username="u",
        docker_registry_password="p4ssword",
        docker_registry="127.0.0.1:5000",
        data_dir=tmp_path,
    )
    components = Components(settings)
    job, _ = store.request_build("m", "1")
    recorder = StepRecorder(store, job_id=job.id, attempt=1, kind="build")
    with recorder.active(), components.registry("127.0.0.1:5000") as client:
        report = client._on_blob  # what upload_blob calls, possibly from helper threads
    report("uploaded", 300)
    report("present", 1000)
    recorder.finish(ATTEMPT_SUCCEEDED)
    with components.registry("127.0.0.1:5000") as outside:
        outside._on_blob("uploaded", 5)  # no job: not attributed to anything
    figures = store.figures(bucket_bounds=STEP_BUCKETS)
    assert figures.blob_bytes == {"uploaded": 300, "mounted": 0, "present": 1000}
