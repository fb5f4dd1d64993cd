"""Helpers the end-to-end tests share: waiting for jobs, signed deliveries, running images."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from mlflow_dock.intake.signatures import sign
from support import web
from support.servers import free_port

Job = dict[str, Any]
BUILD_TIMEOUT = 900

IRIS_INPUT = {
    "dataframe_split": {
        "columns": [
            "sepal length (cm)",
            "sepal width (cm)",
            "petal length (cm)",
            "petal width (cm)",
        ],
        "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]],
    }
}


def wait_for_job(
    service: Any, predicate: Callable[[Job], bool], *, timeout: float = BUILD_TIMEOUT
) -> Job:
    """The first finished job matching `predicate`, polling GET /builds."""
    deadline = time.monotonic() + timeout
    jobs: list[Job] = []
    while time.monotonic() < deadline:
        jobs = web.get(f"{service.url}/builds", timeout=10).json()
        for job in jobs:
            if predicate(job) and job["state"] in ("succeeded", "failed"):
                return job
        time.sleep(1)
    raise AssertionError(f"no finished job within {timeout} s; jobs: {jobs}")


def job_detail(service: Any, job_id: str, log_lines: int = 500) -> Job:
    return web.get(f"{service.url}/builds/{job_id}", params={"log_lines": log_lines}).json()


def build_of(model: str, version: str) -> Callable[[Job], bool]:
    return lambda j: j["kind"] == "build" and j["model_name"] == model and j["version"] == version


def alias_of(model: str, alias: str) -> Callable[[Job], bool]:
    return lambda j: j["kind"] == "alias" and j["model_name"] == model and j["alias"] == alias


def created_payload(model: str, version: str) -> dict[str, Any]:
    return {
        "entity": "model_version",
        "action": "created",
        "data": {"name": model, "version": version},
    }


def signed_delivery(
    service: Any, secret: str, payload: dict[str, Any], delivery_id: str | None = None
) -> httpx.Response:
    """POST a delivery signed exactly as MLflow signs it."""
    body = json.dumps(payload).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()))
    return web.post(
        f"{service.url}/webhook",
        content=body,
        headers={
            "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": sign(secret, delivery_id, ts, body),
            "Content-Type": "application/json",
        },
        timeout=10,
    )


@contextlib.contextmanager
def serving_on_host_network(
    docker_client: Any, image: str, ready_path: str = "/ping"
) -> Iterator[str]:
    """Run `image` as platforms do (host network, $PORT injected); its URL once `ready_path`
    answers 200. Removed afterwards."""
    port = free_port()
    container = docker_client.containers.run(
        image, detach=True, network_mode="host", environment={"PORT": str(port)}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                # Stock images' nginx answers 502 until uvicorn is up; only 200 means ready.
                if web.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(container.logs().decode()[-3000:])
        yield url
    finally:
        container.remove(force=True)


def invoke(docker_client: Any, image: str) -> httpx.Response:
    """Run `image` as platforms do (host network, $PORT injected) and POST the iris input."""
    with serving_on_host_network(docker_client, image) as url:
        return web.post(f"{url}/invocations", json=IRIS_INPUT, timeout=30)
