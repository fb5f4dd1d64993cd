"""Proves the integration fixtures talk to real collaborators before any service test relies
on them: an authenticated registry that Docker can push to, a base image that runs Python,
an MLflow server that really delivers signed webhooks, and a service starter that can
start, kill, restart and stop a process.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
import time
import uuid
from pathlib import Path

import docker
import httpx
import mlflow.artifacts
import pytest

from mlflow import MlflowClient
from support import web
from support.servers import (
    MlflowServer,
    RegistryServer,
    ServerStartError,
    log_sklearn_model,
    register_model_version,
    start_service,
)
from support.webhooks import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookRecorder,
)


def _tiny_image_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = f"mlflow-dock infrastructure test {uuid.uuid4()}\n".encode()
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _push(client: docker.DockerClient, repo: str, tag: str, auth: dict[str, str]) -> list[dict]:
    return list(client.api.push(repo, tag=tag, auth_config=auth, stream=True, decode=True))


def _push_errors(events: list[dict]) -> list[str]:
    return [str(e.get("error") or e.get("errorDetail")) for e in events if "error" in e]


def test_registry_requires_auth(registry: RegistryServer) -> None:
    anonymous = web.get(f"{registry.url}/v2/_catalog", timeout=5)
    assert anonymous.status_code == 401
    assert "basic" in anonymous.headers.get("www-authenticate", "").lower()

    wrong = web.get(f"{registry.url}/v2/_catalog", auth=("dock", "wrong"), timeout=5)
    assert wrong.status_code == 401

    ok = web.get(f"{registry.url}/v2/_catalog", auth=registry.auth, timeout=5)
    assert ok.status_code == 200
    assert "repositories" in ok.json()


def test_push_with_per_call_credentials(
    docker_client: docker.DockerClient, registry: RegistryServer
) -> None:
    repo = f"{registry.host}/infra/tiny-{uuid.uuid4().hex[:8]}"
    docker_client.api.import_image_from_data(_tiny_image_tar(), repository=repo, tag="v1")
    before = registry.stored_bytes()
    try:
        denied = _push(
            docker_client, repo, "v1", {"username": registry.username, "password": "wrong"}
        )
        assert _push_errors(denied), f"push with a wrong password succeeded: {denied[-3:]}"

        events = _push(docker_client, repo, "v1", registry.auth_config)
        assert not _push_errors(events), events[-3:]
        assert any("Digest" in e.get("aux", {}) for e in events), events[-3:]
    finally:
        docker_client.images.remove(f"{repo}:v1", force=True, noprune=True)

    name = repo.split("/", 1)[1]
    tags = web.get(f"{registry.url}/v2/{name}/tags/list", auth=registry.auth, timeout=5)
    assert tags.status_code == 200
    assert tags.json()["tags"] == ["v1"]
    assert registry.stored_bytes() > before


def test_base_image_runs_python(docker_client: docker.DockerClient, base_image: str) -> None:
    out = docker_client.containers.run(
        base_image,
        ["python3", "-c", "import sys, venv, ssl; print(sys.version_info[:2])"],
        network_mode="host",
        remove=True,
    )
    assert out.decode().strip() == "(3, 11)"


def test_mlflow_delivers_signed_webhook(
    mlflow_server: MlflowServer,
    mlflow_client: MlflowClient,
    webhook_factory,
    model_name: str,
    tmp_path: Path,
) -> None:
    secret = uuid.uuid4().hex
    with WebhookRecorder() as receiver:
        webhook_factory(receiver.url, secret, events=["model_version.created"])
        # The server re-reads its webhook list once its cache (TTL 1s here) expires; logging a
        # model takes far longer than that, so no explicit wait is needed.
        started = time.monotonic()
        version = log_sklearn_model(mlflow_server.url, model_name)
        delivery = receiver.wait_for(
            lambda r: r.json().get("data", {}).get("name") == model_name, timeout=30
        )
        delay = time.monotonic() - started

        # Cheap extra versions for tests that need many events: delivered within ~50ms.
        copy = register_model_version(
            mlflow_server.url, model_name, from_model=model_name, from_version=version
        )
        receiver.wait_for(lambda r: r.json()["data"].get("version") == copy, timeout=10)

    for header in (SIGNATURE_HEADER, DELIVERY_ID_HEADER, TIMESTAMP_HEADER):
        assert header.lower() in delivery.headers, delivery.headers
    assert delivery.headers[SIGNATURE_HEADER.lower()].startswith("v1,")
    assert delivery.signature_valid(secret)
    assert not delivery.signature_valid(secret + "x")
    assert abs(int(delivery.headers[TIMESTAMP_HEADER.lower()]) - time.time()) < 120
    body = delivery.json()
    assert (body["entity"], body["action"]) == ("model_version", "created")
    assert body["data"]["version"] == version
    print(f"log + delivery took {delay:.1f}s")

    # What the service will do next: resolve the version and download it over HTTP.
    uri = mlflow_client.get_model_version_download_uri(model_name, version)
    assert uri.startswith("mlflow-artifacts:"), uri
    local = mlflow.artifacts.download_artifacts(
        uri, tracking_uri=mlflow_server.url, dst_path=str(tmp_path)
    )
    assert (Path(local) / "MLmodel").is_file()
    assert "scikit-learn==" in (Path(local) / "requirements.txt").read_text()


# A stand-in for `mlflow-dock serve` with the same contract (PORT, GET /health), so the
# starter's lifecycle handling is tested independently of the real service's progress.
_STAND_IN = """
import os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("stand-in up", flush=True)
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def test_service_starter_lifecycle(tmp_path: Path) -> None:
    service = start_service({}, tmp_path, command=(sys.executable, "-c", _STAND_IN))
    try:
        assert web.get(f"{service.url}/health", timeout=5).status_code == 200
        first_pid = service.pid

        service.kill()
        assert not service.running
        with pytest.raises(httpx.TransportError):
            web.get(f"{service.url}/health", timeout=2)

        service.restart()
        assert service.running and service.pid != first_pid
        assert web.get(f"{service.url}/health", timeout=5).status_code == 200
    finally:
        assert service.stop() == 0
    assert service.log_text().count("stand-in up") == 2


def test_service_starter_reports_log_tail_on_early_exit(tmp_path: Path) -> None:
    crash = "import sys; print('boom: bad config', flush=True); sys.exit(3)"
    with pytest.raises(ServerStartError, match="boom: bad config"):
        start_service({}, tmp_path, command=(sys.executable, "-c", crash))


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow_dock.__main__") is None,
    reason="mlflow_dock has no __main__ yet",
)
def test_real_service_becomes_healthy(service_factory) -> None:
    service = service_factory()
    health = web.get(f"{service.url}/health", timeout=5)
    assert health.status_code == 200
    assert service.stop() is not None
    print(json.dumps({k: v for k, v in service.env.items() if k.startswith("MLFLOW_DOCK")}))
