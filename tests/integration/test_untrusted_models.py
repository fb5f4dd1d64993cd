"""What a model version carries never decides what the service reads or which hosts it contacts.

Against the real parts: an MLflow server, the test registry and `mlflow-dock serve`. Every
version here is refused before anything is built, so these run in seconds, without a build:
requirements that read a worker file or reach a host (imaging/requirements.py), and artifact
locations outside the tracking server (mlflow/sources.py). A TCP listener stands in for the
host a model points at and must see no connection at all.
"""

from __future__ import annotations

import socketserver
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow import MlflowClient
from support import web
from support.jobs import build_of, created_payload, job_detail, signed_delivery, wait_for_job
from support.servers import MlflowServer

MLMODEL = """\
artifact_path: model
flavors:
  python_function:
    loader_module: mlflow.sklearn
    python_version: 3.11.7
mlflow_version: 3.17.2
"""


class Listener(socketserver.ThreadingTCPServer):
    """A host a model points at: records every connection it is sent (there must be none)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.connections: list[bytes] = []
        super().__init__(("127.0.0.1", 0), _Record)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Record(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(2)
        try:
            data = self.request.recv(4096)
        except OSError:
            data = b""
        self.server.connections.append(data)  # type: ignore[attr-defined]


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def register(
    client: MlflowClient,
    tmp_path: Path,
    name: str,
    *,
    requirements: str = "numpy==2.4.6\n",
    experiment_id: str = "0",
    upload: bool = True,
) -> str:
    """A new version of `name`: a hand-made pyfunc model logged in a run, as `runs:/<run>/model`.

    Hand-made rather than logged with MLflow: MLflow would read a `-r FILE` line itself while
    logging, and nothing here gets as far as loading the model.
    """
    model = tmp_path / f"model-{uuid.uuid4().hex[:8]}"
    model.mkdir()
    (model / "MLmodel").write_text(MLMODEL)
    (model / "requirements.txt").write_text(requirements)
    run = client.create_run(experiment_id)
    if upload:
        client.log_artifacts(run.info.run_id, str(model), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except Exception as exc:  # already there: a second version of the same model
        if "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    source = f"runs:/{run.info.run_id}/model"
    return str(client.create_model_version(name, source, run_id=run.info.run_id).version)


def failed_build(service, secret: str, name: str, version: str) -> dict:
    response = signed_delivery(service, secret, created_payload(name, version))
    assert response.status_code == 202, response.text
    job = wait_for_job(service, build_of(name, version), timeout=180)
    assert job["state"] == "failed" and job["attempts"] == 1, job
    return job


def wait_for_error_tag(client: MlflowClient, name: str, version: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tags = client.get_model_version(name, version).tags
        if tags.get("mlflow_dock.status") == "failed" and "mlflow_dock.error" in tags:
            return str(tags["mlflow_dock.error"])
        time.sleep(0.5)
    raise AssertionError(f"no failure written back to {name} v{version}: {tags}")


def test_requirements_that_read_worker_files_or_reach_hosts_fail_before_any_request(
    service_factory, mlflow_client, model_name, tmp_path, listener
):
    service = service_factory(MLFLOW_DOCK_SMOKE_TEST="false")
    secret = service_factory.secret
    # A file on the worker, as /etc/passwd or the service's own configuration would be.
    marker = f"worker-only-{uuid.uuid4().hex}"
    worker_file = tmp_path / "worker-secret.txt"
    worker_file.write_text(f"{marker}\nroot:x:0:0:root:/root:/bin/bash\n")
    hostile = {
        "read": (f"numpy==2.4.6\n-r {worker_file}\n", 2, f"'-r {worker_file}'"[:40]),
        "index": (
            f"numpy==2.4.6\n# our mirror\n--extra-index-url http://127.0.0.1:{listener.port}/simple/\n",
            3,
            "'--extra-index-url http://127.0.0.1:",
        ),
        "url": (
            f"pkg @ http://127.0.0.1:{listener.port}/pkg-1.0-py3-none-any.whl\n",
            1,
            "'pkg @ http://127.0.0.1:",
        ),
    }
    versions = {
        case: register(mlflow_client, tmp_path, model_name, requirements=text)
        for case, (text, _, _) in hostile.items()
    }
    for case, (_, line, shown) in hostile.items():
        job = failed_build(service, secret, model_name, versions[case])
        assert job["error"].startswith(f"requirements.txt line {line}: {shown}"), job["error"]
        # The reason everywhere it is shown: the API, the job log, the board, MLflow's tags.
        detail = job_detail(service, job["id"])
        shown_everywhere = [
            job["error"],
            web.get(f"{service.url}/builds", params={"model": model_name}).text,
            "\n".join(detail["log_tail"]),
            web.get(f"{service.url}/").text,
            web.get(f"{service.url}/models/{model_name}").text,
            wait_for_error_tag(mlflow_client, model_name, versions[case]),
        ]
        for text in shown_everywhere:
            assert marker not in text and "root:x:0:0" not in text
        assert any(f"line {line}" in text for text in shown_everywhere[3:5])
    assert marker not in service.log_text()
    assert listener.connections == []


def test_artifacts_outside_the_tracking_server_are_never_fetched(
    service_factory, mlflow_server: MlflowServer, mlflow_client, model_name, tmp_path, listener
):
    service = service_factory(
        MLFLOW_DOCK_SMOKE_TEST="false",
        # Were the service to fetch from S3, boto3 would connect to the listener.
        MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{listener.port}",
        AWS_ACCESS_KEY_ID="service-key-id",
        AWS_SECRET_ACCESS_KEY="service-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    secret = service_factory.secret
    suffix = uuid.uuid4().hex[:8]

    # 1. MLflow 3.17 refuses a host-addressed source unless its operator allows the scheme
    # (MLFLOW_ALLOWED_HOST_ADDRESSED_ARTIFACT_SCHEMES); older servers store any. Stored as such
    # a server stores it, straight in its database.
    evil = f"http://127.0.0.1:{listener.port}/evil"
    with pytest.raises(Exception, match="cannot use the 'http' scheme"):
        mlflow_client.create_model_version(model_name, evil)
    http_version = register(mlflow_client, tmp_path, model_name)
    database = mlflow_server.backend_store_uri.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        db.execute(
            "UPDATE model_versions SET source = ?, storage_location = ? "
            "WHERE name = ? AND version = ?",
            (evil, evil, model_name, int(http_version)),
        )
    assert mlflow_client.get_model_version_download_uri(model_name, http_version) == evil

    # 2. and 3. Accepted by a default MLflow server: an experiment whose artifact location is
    # the worker's own file system or any S3 bucket; its runs:/ URIs resolve there.
    outside = tmp_path / "outside"
    file_experiment = mlflow_client.create_experiment(
        f"outside-{suffix}", artifact_location=outside.as_uri()
    )
    file_version = register(mlflow_client, tmp_path, model_name, experiment_id=file_experiment)
    s3_experiment = mlflow_client.create_experiment(
        f"bucket-{suffix}", artifact_location="s3://another-teams-bucket/models"
    )
    s3_version = register(
        mlflow_client, tmp_path, model_name, experiment_id=s3_experiment, upload=False
    )

    expected = {
        http_version: f"model artifacts at '{evil}' are not downloaded",
        file_version: f"model artifacts at '{outside.as_uri()}/",
        s3_version: "model artifacts at 's3://another-teams-bucket/models/",
    }
    for version, reason in expected.items():
        job = failed_build(service, secret, model_name, version)
        assert job["error"].startswith(reason), job["error"]
        assert "MLFLOW_DOCK_ALLOWED_SOURCES" in job["error"]
    assert listener.connections == []
