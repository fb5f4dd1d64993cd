"""Prometheus metrics: per-replica counters plus figures read from the job store at scrape time.

Two kinds of series, on purpose:

- Store-derived (`StoreCollector`): jobs by kind and state, queue depth and age, attempts by
  outcome, retries by cause, smoke-test failures, step durations, registry bytes. They are read
  from the shared job store on every scrape, so they are right wherever the workers run, and
  every replica reports the same values (aggregate them with `max`, not `sum`).
- Per replica (`ServiceMetrics` counters): webhook deliveries by outcome and jobs queued by
  reconciliation happen in the process that served them; sum them across replicas.

Each app owns its `CollectorRegistry`: no process-wide default registry, so two apps in one
process (tests) never share or collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mlflow_dock.jobs.model import JobKind, JobState, Lane
from mlflow_dock.jobs.steps import ATTEMPT_OUTCOMES, BLOB_OUTCOMES, STEP_NAMES, StoreFigures

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; steps range from a sub-second registry tag to a half-hour engine build.
STEP_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

# The answers the webhook endpoint gives, as the `outcome` label ("duplicate" is a 202 for a
# delivery or event already seen; "500" is our own failure).
WEBHOOK_OUTCOMES = ("202", "duplicate", "400", "401", "413", "422", "500")


class FiguresSource(Protocol):
    def figures(self, *, bucket_bounds: Sequence[float]) -> StoreFigures: ...


class StoreCollector(Collector):
    """Reads the job store on every scrape (one short read transaction)."""

    def __init__(self, store: FiguresSource) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        # Registration must not touch the store (it may not be reachable yet).
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "mlflow_dock_store_up", "1 if the job store could be read for this scrape"
        )
        try:
            figures = self._store.figures(bucket_bounds=STEP_BUCKETS)
        except Exception as exc:
            logger.warning("metrics: reading the job store failed: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *_store_metrics(figures)]


def _store_metrics(f: StoreFigures) -> list[Metric]:
    jobs = GaugeMetricFamily(
        "mlflow_dock_jobs", "Jobs in the store by kind and current state", labels=["kind", "state"]
    )
    for kind in JobKind:
        for state in JobState:
            jobs.add_metric([kind.value, state.value], f.jobs.get((kind.value, state.value), 0))
    depth = GaugeMetricFamily(
        "mlflow_dock_queue_depth",
        "Jobs waiting to run (state queued), by lane: build, or alias (alias and unalias jobs)",
        labels=["lane"],
    )
    age = GaugeMetricFamily(
        "mlflow_dock_queue_oldest_age_seconds",
        "How long the longest-waiting runnable queued job of the lane has been runnable (0 when "
        "none is); an alias waiting for its version's build is not runnable yet",
        labels=["lane"],
    )
    for lane in Lane:
        depth.add_metric([lane.value], f.queue_depth.get(lane.value, 0))
        age.add_metric([lane.value], f.oldest_queued_seconds.get(lane.value, 0.0))
    attempts = CounterMetricFamily(
        "mlflow_dock_job_attempts",
        "Job attempts that ended, by kind and outcome (succeeded, retry, failed)",
        labels=["kind", "outcome"],
    )
    for kind in JobKind:
        for outcome in ATTEMPT_OUTCOMES:
            attempts.add_metric([kind.value, outcome], f.attempts.get((kind.value, outcome), 0))
    retries = CounterMetricFamily(
        "mlflow_dock_job_retries",
        "Attempts that ended in a retry, by cause (the step that failed)",
        labels=["cause"],
    )
    for cause, count in sorted(f.retries.items()):
        retries.add_metric([cause], count)
    smoke = CounterMetricFamily(
        "mlflow_dock_smoke_test_failures", "Attempts whose smoke test failed"
    )
    smoke.add_metric([], f.smoke_failures)
    steps = HistogramMetricFamily(
        "mlflow_dock_step_duration_seconds",
        "Duration of finished job steps (resolve, assemble, build, smoke, push, tag, untag)",
        labels=["step"],
    )
    for name in sorted(set(STEP_NAMES) | set(f.steps)):
        cumulative, count, total = f.steps.get(name, ([0] * len(f.bucket_bounds), 0, 0.0))
        buckets = [(_bound(b), c) for b, c in zip(f.bucket_bounds, cumulative, strict=True)]
        buckets.append(("+Inf", count))
        steps.add_metric([name], buckets, total)
    blobs = CounterMetricFamily(
        "mlflow_dock_registry_blob_bytes",
        "Bytes of image blobs by how they reached the registry: uploaded, mounted from another "
        "repository, or already present",
        labels=["outcome"],
    )
    for outcome in BLOB_OUTCOMES:
        blobs.add_metric([outcome], f.blob_bytes.get(outcome, 0))
    return [jobs, depth, age, attempts, retries, smoke, steps, blobs]


def _bound(value: float) -> str:
    return str(float(value))


class ServiceMetrics:
    """One app's registry: its per-replica counters and, once the store exists, the store's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._webhooks = Counter(
            "mlflow_dock_webhook_deliveries",
            "Webhook deliveries by the answer given: HTTP status, or duplicate",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in WEBHOOK_OUTCOMES:
            self._webhooks.labels(outcome)
        self._reconciled = Counter(
            "mlflow_dock_reconcile_queued",
            "Jobs queued by reconciliation: versions and aliases found without a webhook",
            ["kind"],
            registry=self.registry,
        )
        for kind in JobKind:
            self._reconciled.labels(kind.value)
        self._store_collector: StoreCollector | None = None

    def webhook_delivery(self, outcome: str) -> None:
        self._webhooks.labels(outcome if outcome in WEBHOOK_OUTCOMES else "500").inc()

    def reconciled(self, kind: str) -> None:
        self._reconciled.labels(kind).inc()

    def watch_store(self, store: FiguresSource) -> None:
        """Add the store's figures to every scrape (again after a restart of the lifespan)."""
        if self._store_collector is not None:
            self.registry.unregister(self._store_collector)
        self._store_collector = StoreCollector(store)
        self.registry.register(self._store_collector)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes; reads the store, so call it off the event loop."""
        return generate_latest(self.registry)
