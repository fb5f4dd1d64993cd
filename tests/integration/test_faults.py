"""Faults in the embedded mode (threads in `serve`, SQLite): a killed replica, a frozen registry.

The celery counterparts live in test_distributed.py.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from support import web
from support.jobs import created_payload, signed_delivery
from support.servers import log_sklearn_model, register_model_version, start_registry

FREEZE_SECONDS = 90

EMBEDDED = {
    "MLFLOW_DOCK_LEASE_SECONDS": "3",
    "MLFLOW_DOCK_RETRY_BACKOFF_SECONDS": "1",
    "MLFLOW_DOCK_MAX_BACKOFF_SECONDS": "5",
    "MLFLOW_DOCK_MAX_ATTEMPTS": "2",
    "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
    "MLFLOW_DOCK_BUILD_NETWORK": "host",
    "MLFLOW_DOCK_SMOKE_TEST": "false",
}


def deliver(service, secret, model, version) -> str:
    response = signed_delivery(service, secret, created_payload(model, version))
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def job(service, job_id, log_lines: int = 0):
    params = {"log_lines": log_lines} if log_lines else None
    return web.get(f"{service.url}/builds/{job_id}", params=params, timeout=10).json()


def wait_state(service, job_id, states, timeout: float = 600):
    deadline = time.monotonic() + timeout
    current = None
    while time.monotonic() < deadline:
        current = job(service, job_id)
        if current["state"] in states:
            return current
        # A job that ended otherwise never gets there: say so now, not at the deadline.
        assert current["state"] not in ("failed", "succeeded"), current
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {states}: {current}")


def test_killed_embedded_replica_on_sqlite(service_factory, mlflow_server, tmp_path: Path):
    """kill -9 of the replica running a build: a second replica on the same SQLite store takes
    the job over once its lease expires (no restart needed), and publishes it once."""
    data = str(tmp_path / "shared-data")
    first = service_factory(MLFLOW_DOCK_DATA_DIR=data, **EMBEDDED)
    model = f"emb-{uuid.uuid4().hex[:8]}"
    version = log_sklearn_model(mlflow_server.url, model)
    job_id = deliver(first, service_factory.secret, model, version)
    wait_state(first, job_id, {"running"})
    first.kill()
    second = service_factory(MLFLOW_DOCK_DATA_DIR=data, **EMBEDDED)
    done = wait_state(second, job_id, {"succeeded"})
    assert done["attempts"] == 2
    lines = job(second, job_id, log_lines=500)["log_tail"]
    assert any("expired" in line for line in lines), lines


def test_frozen_registry_then_every_job_succeeds(
    service_factory, mlflow_server, registry, tmp_path: Path
):
    """The registry is stopped (SIGSTOP) for 90 s while versions are being published (from
    just before they are delivered).

    Longer than the registry client's 30 s timeout times the attempts (MAX_ATTEMPTS=2): every
    job in flight times out, is retried, runs out of attempts and waits (capped backoff of
    5 s), and completes once the registry answers again. Requests the frozen registry still
    holds are answered after SIGCONT, late: a tag PUT of an attempt that already gave up may
    land then, which is what publish_manifest's check before each tag PUT is for.
    """
    private = start_registry(tmp_path / "registry", registry.username, registry.password)
    try:
        service = service_factory(
            DOCKER_REGISTRY=private.host, MLFLOW_DOCK_DATA_DIR=str(tmp_path / "data"), **EMBEDDED
        )
        model = f"freeze-{uuid.uuid4().hex[:8]}"
        first = log_sklearn_model(mlflow_server.url, model)
        wait_state(service, deliver(service, service_factory.secret, model, first), {"succeeded"})
        versions = [
            register_model_version(mlflow_server.url, model, from_model=model, from_version=first)
            for _ in range(3)
        ]
        pid = private._proc.pid  # the test owns this process
        os.killpg(pid, signal.SIGSTOP)
        try:
            # Frozen before the deliveries: an assembly takes about a second, so frozen after
            # the first job was seen running, the freeze could find every job done already.
            ids = [deliver(service, service_factory.secret, model, v) for v in versions]
            wait_state(service, ids[0], {"running"})
            time.sleep(FREEZE_SECONDS)
        finally:
            os.killpg(pid, signal.SIGCONT)
        ended = [wait_state(service, job_id, {"succeeded"}, timeout=300) for job_id in ids]
        # The freeze did hit work in flight: it timed out and was retried, not failed.
        assert any(j["attempts"] > 1 for j in ended), ended
    finally:
        private.stop()
