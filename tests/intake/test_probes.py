from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from mlflow_dock.app import Components, Service
from mlflow_dock.intake.api import create_app
from mlflow_dock.intake.probes import Readiness, broker_check
from mlflow_dock.jobs.model import Lane
from mlflow_dock.settings import Settings

SECRET = "whsec-probe"


class _Runner:
    def run(self, job, log):  # pragma: no cover - no job runs in these tests
        raise AssertionError("no build expected")


def _settings(tmp_path, **overrides) -> Settings:
    values = {
        "_env_file": None,
        "webhook_secret": SECRET,
        "docker_username": "dock",
        "docker_registry_password": "pw",
        "docker_registry": "127.0.0.1:5000",
        "data_dir": tmp_path,
        "mlflow_write_back": False,
        "reconcile_interval_seconds": 0,
        "smoke_test": False,
        "docker_host": "unix:///nonexistent/docker.sock",
    }
    values.update(overrides)
    return Settings(**values)


def _service(settings: Settings) -> Service:
    components = Components(settings)
    components.runner = _Runner()  # type: ignore[assignment]
    return Service(components)


def test_ready_reports_store_and_workers(tmp_path):
    service = _service(_settings(tmp_path))
    with TestClient(create_app(lambda: service)) as client:
        response = client.get("/ready")
        assert response.status_code == 200
        assert response.json() == {
            "status": "ready",
            "checks": {"store": "ok", "workers": "ok", "alias_workers": "ok"},
            "not_ready": [],
        }
        # Liveness stays what it was: the process answers.
        assert client.get("/health").json() == {"status": "healthy"}


@pytest.mark.parametrize(
    ("lane", "check"), [(Lane.BUILD, "workers"), (Lane.ALIAS, "alias_workers")]
)
def test_ready_is_503_naming_dead_workers(tmp_path, lane, check):
    service = _service(_settings(tmp_path))
    with TestClient(create_app(lambda: service)) as client:
        service.lanes.pools[lane].stop()
        response = client.get("/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not ready"
        assert body["not_ready"] == [check]
        assert body["checks"]["store"] == "ok"
        assert client.get("/health").status_code == 200


def test_ready_is_503_when_the_store_is_gone(tmp_path):
    service = _service(_settings(tmp_path))
    with TestClient(create_app(lambda: service)) as client:

        def broken() -> None:
            raise OSError("disk I/O error at /secret/path")

        service.store.ping = broken  # type: ignore[method-assign]
        response = client.get("/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["not_ready"] == ["store"]
        # The type only: messages of store and broker clients can carry URLs and passwords.
        assert body["checks"]["store"] == "failed (OSError)"
        assert "secret" not in response.text


def test_an_api_replica_checks_only_its_alias_lane(tmp_path):
    service = _service(_settings(tmp_path, build_concurrency=0))
    with TestClient(create_app(lambda: service)) as client:
        response = client.get("/ready")
        assert response.status_code == 200
        assert response.json()["checks"] == {"store": "ok", "alias_workers": "ok"}
        assert list(service.lanes.pools) == [Lane.ALIAS]


def test_intake_only_process_has_no_worker_check(tmp_path):
    service = _service(_settings(tmp_path, build_concurrency=0, alias_concurrency=0))
    with TestClient(create_app(lambda: service)) as client:
        response = client.get("/ready")
        assert response.status_code == 200
        assert response.json()["checks"] == {"store": "ok"}
        assert not service.lanes.pools


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_celery_executor_checks_the_broker_without_leaking_its_url(tmp_path):
    url = f"redis://:broker-password@127.0.0.1:{_closed_port()}/0"
    settings = _settings(tmp_path, executor="celery", broker_url=url)
    service = _service(settings)
    # Only the probe is under test here: the API is built without starting any executor.
    with TestClient(create_app(lambda: service, start_workers=False)) as client:
        response = client.get("/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["not_ready"] == ["broker"]
        assert body["checks"]["store"] == "ok"
        assert "workers" not in body["checks"]
        assert "broker-password" not in response.text


@pytest.mark.anyio
async def test_a_hanging_check_times_out_and_the_others_still_report():
    release = threading.Event()
    readiness = Readiness(
        {"slow": lambda: release.wait(5), "fine": lambda: None, "down": lambda: False},
        timeout=0.2,
    )
    started = time.monotonic()
    report = await readiness.report()
    release.set()
    assert time.monotonic() - started < 2
    assert not report.ready
    assert report.checks == {"slow": "timed out after 0.2 s", "fine": "ok", "down": "down"}
    assert report.body()["not_ready"] == ["down", "slow"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (bash .ci/run installs it)")
    port = _closed_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_broker_check_against_a_real_redis(redis_url):
    broker_check(redis_url)()


def test_broker_check_fails_for_a_closed_port():
    with pytest.raises(Exception):  # noqa: B017 - kombu raises its own OperationalError
        broker_check(f"redis://127.0.0.1:{_closed_port()}/0", timeout=1)()
