from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from mlflow_dock.app import Components, Service
from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.intake.api import STATUS_CODES, create_app
from mlflow_dock.intake.signatures import sign
from mlflow_dock.jobs.model import JobKind, JobOutcome
from mlflow_dock.settings import Settings

SECRET = "whsec-test-value"
DIGEST = "sha256:" + "c" * 64


class FakeRunner:
    """Stands in for Docker + registry so the API's own behaviour can be pinned down."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []
        self.fail_with: Exception | None = None

    def run(self, job, log):
        self.calls.append((job.kind.value, job.version, job.alias))
        log(f"fake build with password {PASSWORD}")
        if self.fail_with is not None:
            raise self.fail_with
        ref = f"reg/m:{job.alias or job.version}"
        return JobOutcome(image=ref, digest=DIGEST, tags=(ref,))


PASSWORD = "registry-pass-xyz"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        _env_file=None,
        webhook_secret=SECRET,
        docker_username="dock",
        docker_registry_password=PASSWORD,
        docker_registry="127.0.0.1:5000",
        data_dir=tmp_path,
        retry_backoff_seconds=0.05,
        max_attempts=2,
        mlflow_write_back=False,
        reconcile_interval_seconds=0,
        # The fake runner needs no engine; leave smoke containers on this machine alone.
        smoke_test=False,
    )


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def client(settings, runner):
    components = Components(settings)
    components.runner = runner  # type: ignore[assignment]
    service = Service(components)
    with TestClient(create_app(lambda: service)) as c:
        yield c


def deliver(client, payload, *, delivery="d-1", secret=SECRET, ts=None, raw=None):
    body = raw if raw is not None else json.dumps(payload).encode()
    ts = str(int(time.time()) if ts is None else ts)
    headers = {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign(secret, delivery, ts, body),
        "Content-Type": "application/json",
    }
    return client.post("/webhook", content=body, headers=headers)


def created(name="Iris Classifier", version="1"):
    return {
        "entity": "model_version",
        "action": "created",
        "data": {"name": name, "version": version},
    }


def alias(name="Iris Classifier", version="1", alias="champion"):
    return {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": name, "version": version, "alias": alias},
    }


def wait_done(client, job_id, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/builds/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_health(client):
    assert client.get("/health").json() == {"status": "healthy"}


def test_accepted_event_becomes_a_visible_build(client, runner):
    response = deliver(client, created())
    assert response.status_code == 202
    job = wait_done(client, response.json()["job_id"])
    assert job["state"] == "succeeded"
    assert job["digest"] == DIGEST
    assert job["image_with_digest"] == f"reg/m@{DIGEST}"
    assert job["model_name"] == "Iris Classifier" and job["version"] == "1"
    assert any("fake build" in line for line in job["log_tail"])
    assert runner.calls == [("build", "1", None)]


def test_build_log_redacts_secrets(client):
    job = wait_done(client, deliver(client, created()).json()["job_id"])
    assert all(PASSWORD not in line for line in job["log_tail"])
    assert any("[REDACTED]" in line for line in job["log_tail"])


def test_replayed_delivery_returns_same_job_and_builds_once(client, runner):
    first = deliver(client, created()).json()
    wait_done(client, first["job_id"])
    again = deliver(client, created())
    assert again.status_code == 202
    assert again.json()["job_id"] == first["job_id"] and again.json()["duplicate"]
    other_delivery = deliver(client, created(), delivery="d-2").json()
    assert other_delivery["job_id"] == first["job_id"]
    assert runner.calls == [("build", "1", None)]


def test_alias_runs_after_the_version_build(client, runner):
    job_id = deliver(client, alias(), delivery="a-1").json()["job_id"]
    job = wait_done(client, job_id)
    assert job["kind"] == JobKind.ALIAS and job["state"] == "succeeded"
    assert runner.calls == [("build", "1", None), ("alias", "1", "champion")]


def test_permanent_failure_is_visible_with_reason(client, runner):
    runner.fail_with = PermanentError("model 'x' version 1: not found")
    job = wait_done(client, deliver(client, created()).json()["job_id"])
    assert job["state"] == "failed" and "not found" in job["error"]
    assert len(runner.calls) == 1


def test_transient_failure_waits_past_max_attempts_then_completes(client, runner):
    runner.fail_with = RetryableError("registry answered 503")
    job_id = deliver(client, created()).json()["job_id"]
    deadline = time.time() + 10
    while (job := client.get(f"/builds/{job_id}").json())["attempts"] < 4:
        assert time.time() < deadline, job
        time.sleep(0.05)
    # Past max_attempts=2 it never ends failed for a cause that may go away: it waits.
    assert job["state"] in ("queued", "running")
    assert job["state"] == "running" or job["error"] == "waiting: registry answered 503"
    runner.fail_with = None
    assert wait_done(client, job_id)["state"] == "succeeded"


def test_webhook_path_on_postgresql(settings, runner):
    from support.databases import postgres_schema

    with postgres_schema() as url:
        components = Components(settings.model_copy(update={"database_url": url}))
        components.runner = runner  # type: ignore[assignment]
        service = Service(components)
        with TestClient(create_app(lambda: service)) as pg_client:
            first = deliver(pg_client, created())
            assert first.status_code == 202
            assert wait_done(pg_client, first.json()["job_id"])["state"] == "succeeded"
            assert deliver(pg_client, created()).json()["duplicate"]
            alias_id = deliver(pg_client, alias(), delivery="a-1").json()["job_id"]
            assert wait_done(pg_client, alias_id)["state"] == "succeeded"


def test_unexpected_exception_fails_the_job_not_the_service(client, runner):
    runner.fail_with = KeyError("surprise")
    job = wait_done(client, deliver(client, created()).json()["job_id"])
    assert job["state"] == "failed" and job["error"].startswith("internal error")
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "detail"),
    [
        ({"secret": "wrong"}, 401, "invalid webhook signature"),
        ({"ts": 1}, 400, "allowed: 300"),
        ({"ts": int(time.time()) + 3600}, 400, "allowed: 300"),
        ({"raw": b"{not json"}, 422, "not valid JSON"),
        (
            {"raw": json.dumps({"entity": "prompt", "action": "created", "data": {}}).encode()},
            422,
            "supported events",
        ),
    ],
)
def test_error_codes(client, kwargs, status, detail):
    response = deliver(client, created(), **kwargs)
    assert response.status_code == status
    assert detail in response.json()["detail"]


def test_missing_headers(client):
    body = json.dumps(created()).encode()
    assert client.post("/webhook", content=body).status_code == 400
    ts = str(int(time.time()))
    no_sig = {"X-MLflow-Timestamp": ts, "X-MLflow-Delivery-Id": "x"}
    response = client.post("/webhook", content=body, headers=no_sig)
    assert response.status_code == 401 and "missing" in response.json()["detail"]


def test_body_over_one_mib_is_413(client):
    response = deliver(client, None, raw=b"{" + b" " * (1024 * 1024) + b"}")
    assert response.status_code == 413


@pytest.mark.parametrize("depth", [100, 100_000, 500_000])
def test_a_signed_deeply_nested_body_is_422_not_500(client, runner, depth):
    raw = b'{"entity":"model_version","action":"created","data":{"name":"m","version":"1","x":'
    raw += b"[" * depth + b"]" * depth + b"}}"
    response = deliver(client, None, raw=raw[: 1024 * 1024])
    assert response.status_code in (413, 422), response.text
    if len(raw) <= 1024 * 1024:
        assert response.status_code == 422 and "levels deep" in response.json()["detail"]
    assert client.get("/health").status_code == 200 and runner.calls == []


def test_invalid_json_is_rejected_only_after_authentication(client):
    response = deliver(client, None, raw=b"garbage", secret="wrong")
    assert response.status_code == 401


def test_builds_listing_and_404(client):
    job_id = deliver(client, created()).json()["job_id"]
    wait_done(client, job_id)
    listed = client.get("/builds", params={"model": "Iris Classifier"}).json()
    assert [j["id"] for j in listed] == [job_id]
    assert client.get("/builds", params={"model": "other"}).json() == []
    assert client.get("/builds", params={"state": "bogus"}).status_code == 422
    assert client.get("/builds/does-not-exist").status_code == 404


def test_openapi_is_served(client):
    assert "/webhook" in client.get("/openapi.json").json()["paths"]


def test_status_table_covers_every_request_error():
    import mlflow_dock.errors as errors

    request_errors = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type)
        and issubclass(obj, errors.RequestError)
        and obj is not errors.RequestError
    }
    assert request_errors == set(STATUS_CODES)


def test_read_endpoints_need_the_token_when_one_is_set(settings, runner):
    from mlflow_dock.intake.auth import ReadAccess

    components = Components(settings)
    components.runner = runner  # type: ignore[assignment]
    service = Service(components)
    app = create_app(lambda: service, read_access=ReadAccess("read-token-1"))
    with TestClient(app) as c:
        assert c.get("/builds").status_code == 401
        assert c.get("/builds", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/builds", headers={"Authorization": "Bearer read-token-1"}).status_code == 200
        assert c.get("/health").status_code == 200
        # The webhook stays HMAC-only: no token needed, the signature decides.
        assert deliver(c, {"entity": "x"}, secret="wrong").status_code == 401


def test_a_store_outage_answers_503_so_mlflow_retries(settings, runner, monkeypatch):
    from sqlalchemy.exc import OperationalError

    components = Components(settings)
    components.runner = runner  # type: ignore[assignment]
    service = Service(components)

    def down(_requests, **_options):
        raise OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))

    with TestClient(create_app(lambda: service)) as c:
        monkeypatch.setattr(service.store, "accept_deliveries", down)
        response = deliver(c, created(), delivery="d-outage")
        assert response.status_code == 503
        assert "retry" in response.json()["detail"]
        monkeypatch.undo()
        # Once the store is back, MLflow's retry of the same delivery is accepted.
        assert deliver(c, created(), delivery="d-outage").status_code == 202


def test_the_declared_route_gives_the_receivers_answers(settings, runner):
    """Without `WebhookReceiver` in front, the FastAPI route of /webhook answers the same."""
    components = Components(settings)
    components.runner = runner  # type: ignore[assignment]
    service = Service(components)
    app = create_app(lambda: service)
    app.user_middleware.clear()
    with TestClient(app) as c:
        first = deliver(c, created(), delivery="d-route")
        assert first.status_code == 202 and not first.json()["duplicate"]
        replay = deliver(c, created(), delivery="d-route")
        assert replay.json() == {**first.json(), "duplicate": True, "state": replay.json()["state"]}
        assert deliver(c, created(), secret="wrong").status_code == 401
        assert deliver(c, None, raw=b"{" + b" " * (1024 * 1024) + b"}").status_code == 413
    layers = _layers(app)
    assert "WebhookReceiver" not in layers and "ExceptionMiddleware" in layers


def _layers(app) -> list[str]:
    layer, names = app.middleware_stack, []
    while layer is not None:
        names.append(type(layer).__name__)
        layer = getattr(layer, "app", None) or getattr(layer, "_app", None)
    return names


def test_webhooks_are_answered_before_routing(client):
    assert deliver(client, created()).status_code == 202
    layers = _layers(client.app)
    assert layers.index("WebhookReceiver") < layers.index("ExceptionMiddleware")
