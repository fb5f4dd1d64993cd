"""Every image speaks MLflow's protocol and the Open Inference Protocol (V2), and each version's
KServe Modelcar runs as KServe runs it: proved with clients nobody here wrote.

One service (the default native builder, Modelcars on), one registered model, three versions
registered in a real MLflow server and built through its real webhook into a real registry:

    1  a column-based scikit-learn model   (built natively)
    2  a tensor-based pyfunc               (same requirements: assembled in the registry on 1,
    3  a pyfunc with params                 its V2 name and version replaced in the config)

Each image runs once (`docker run`, host network, $PORT) and is driven by Triton's
`tritonclient[http]` and the KServe SDK's REST client (tests/support/oip.py), whose predictions
must equal `/invocations`'s on the same rows. The Modelcars run as KServe's sidecar does, as a
non-root user, and one is paired with a server container the way KServe pairs them (one PID
namespace, a shared /mnt, `__pyfunc_model_path__=/mnt/models`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mlflow import MlflowClient
from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support import web
from support.jobs import build_of, wait_for_job
from support.oip import columns_as_tensors, infer_with_kserve, infer_with_tritonclient
from support.servers import (
    free_port,
    log_sklearn_model,
    log_tail,
    service_environment,
    start_service,
)
from support.v2_models import IRIS_COLUMNS

# One worker runs the module: otherwise every worker that draws one of its tests sets up its own
# `built` (a service, three builds and their smoke tests: about two minutes of CI's two cores).
pytestmark = pytest.mark.xdist_group("open-inference")

BUSYBOX = Path(os.environ.get("MLFLOW_DOCK_TEST_BUSYBOX", "/bin/busybox"))
KINDS = ("sklearn", "tensor", "params")


@dataclass(frozen=True)
class Version:
    kind: str
    number: str
    job: dict[str, Any]


@dataclass(frozen=True)
class Built:
    model_name: str
    repository: str  # host/path
    path: str  # inside the registry
    versions: dict[str, Version]
    service_url: str

    def image(self, kind: str) -> str:
        return f"{self.repository}:{self.versions[kind].number}"

    def modelcar(self, kind: str) -> str:
        return f"{self.repository}:{naming.modelcar_tag(self.versions[kind].number)}"


@pytest.fixture(scope="module")
def built(registry, mlflow_server, registry_base_image, tmp_path_factory) -> Iterator[Built]:
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} missing: apt-get install busybox-static (bash .ci/run does)")
    workdir = tmp_path_factory.mktemp("oip-service")
    secret = secrets.token_urlsafe(32)
    env = service_environment(
        registry,
        mlflow_server,
        secret=secret,
        data_dir=workdir / "data",
        base_image=registry_base_image,
        MLFLOW_DOCK_BUILD_NETWORK="host",
        MLFLOW_DOCK_MODELCAR="true",
        MLFLOW_DOCK_MODELCAR_BUSYBOX=str(BUSYBOX),
    )
    service = start_service(env, workdir)
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    hook = client.create_webhook(
        name=f"oip-{uuid.uuid4().hex[:8]}",
        url=f"{service.url}/webhook",
        events=["model_version.created"],
        secret=secret,
    )
    try:
        time.sleep(1.5)  # the MLflow server caches its webhook list for 1 s
        # Spaces and capitals, as real names have: one URL path segment, percent-encoded.
        name = f"Dock OIP {uuid.uuid4().hex[:8]}"
        versions = {}
        for kind in KINDS:
            number = log_sklearn_model(
                mlflow_server.url, name, pyfunc=None if kind == "sklearn" else kind
            )
            job = wait_for_job(service, build_of(name, number), timeout=600)
            assert job["state"] == "succeeded", (kind, job, log_tail(service.log_path, 80))
            versions[kind] = Version(kind, number, job)
        path = naming.repository_name(name)
        yield Built(name, f"{registry.host}/{path}", path, versions, service.url)
    finally:
        client.delete_webhook(hook.webhook_id)
        service.stop()


@dataclass
class Running:
    url: str
    container: Any


@contextlib.contextmanager
def running(docker_client, registry, image: str, **options: Any) -> Iterator[Running]:
    """The image pulled afresh and run as platforms run it: host network, $PORT injected."""
    docker_client.images.pull(image, auth_config=registry.auth_config)
    port = free_port()
    environment = {"PORT": str(port), **options.pop("environment", {})}
    container = docker_client.containers.run(
        image, detach=True, network_mode="host", environment=environment, **options
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if web.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            container.reload()
            if container.status == "exited":
                raise AssertionError(container.logs().decode()[-3000:])
            time.sleep(0.5)
        else:
            raise AssertionError(container.logs().decode()[-3000:])
        yield Running(url, container)
    finally:
        container.remove(force=True)


def invocations(url: str, payload: dict[str, Any]) -> Any:
    response = web.post(f"{url}/invocations", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def iris_rows(count: int) -> Any:
    import pandas as pd
    from sklearn.datasets import load_iris

    features, _ = load_iris(return_X_y=True)
    picked = features[np.random.default_rng(5).integers(0, len(features), count)]
    return pd.DataFrame(picked, columns=list(IRIS_COLUMNS))


def test_a_column_based_sklearn_model(built, docker_client, registry):
    version = built.versions["sklearn"]
    frame = iris_rows(40)
    with running(docker_client, registry, built.image("sklearn")) as server:
        expected = invocations(server.url, {"dataframe_split": frame.to_dict(orient="split")})
        triton = infer_with_tritonclient(
            server.url, built.model_name, columns_as_tensors(frame), version=version.number
        )
        kserve = infer_with_kserve(server.url, built.model_name, columns_as_tensors(frame[:1]))
        json_triton = infer_with_tritonclient(
            server.url, built.model_name, columns_as_tensors(frame[:3]), binary=False
        )
    assert triton.outputs["output-0"].tolist() == expected
    assert kserve.outputs["output-0"].tolist() == expected[:1]
    assert json_triton.outputs["output-0"].tolist() == expected[:3]
    assert triton.model_version == version.number
    assert [t["name"] for t in triton.metadata["inputs"]] == list(IRIS_COLUMNS)
    assert triton.metadata["name"] == built.model_name


def test_a_tensor_based_pyfunc_assembled_on_the_first_version(built, docker_client, registry):
    version = built.versions["tensor"]
    x = np.arange(30, dtype=np.float32).reshape(10, 3) / 7
    with running(docker_client, registry, built.image("tensor")) as server:
        expected = invocations(server.url, {"inputs": {"x": x.tolist()}})
        triton = infer_with_tritonclient(
            server.url, built.model_name, {"x": x}, version=version.number
        )
        kserve = infer_with_kserve(server.url, built.model_name, {"x": x})
        # Another version's name answers 404: the V2 env is this version's, not version 1's.
        assert web.get(f"{server.url}/v2/models/{built.model_name}/versions/1").status_code == 404
    assert triton.outputs["scaled"].tolist() == expected["scaled"]
    assert triton.outputs["sum"].tolist() == expected["sum"]
    assert kserve.outputs["sum"].tolist() == expected["sum"]
    assert triton.model_version == version.number
    assert triton.metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]


def test_a_pyfunc_with_params(built, docker_client, registry):
    version = built.versions["params"]
    a = np.array([1.0, 2.5, -4.0])
    params = {"scale": 3.0, "tag": "abcd"}
    with running(docker_client, registry, built.image("params")) as server:
        expected = invocations(
            server.url, {"dataframe_split": {"columns": ["a"], "data": [[v] for v in a]}}
        )
        with_params = invocations(
            server.url,
            {"dataframe_split": {"columns": ["a"], "data": [[v] for v in a]}, "params": params},
        )
        triton = infer_with_tritonclient(
            server.url, built.model_name, {"a": a}, version=version.number
        )
        triton_params = infer_with_tritonclient(
            server.url, built.model_name, {"a": a}, version=version.number, parameters=params
        )
        kserve = infer_with_kserve(server.url, built.model_name, {"a": a})
    (output,) = triton.outputs
    assert triton.outputs[output].tolist() == expected == [2.0, 3.5, -3.0]  # defaults
    assert triton_params.outputs[output].tolist() == with_params == [7.0, 11.5, -8.0]
    assert kserve.outputs[output].tolist() == expected


def test_every_version_shares_the_serving_layer_and_records_both_protocols(
    built, registry, mlflow_server
):
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        layers = [
            [
                d["digest"]
                for d in json.loads(client.get_manifest(built.path, v.number).body)["layers"]
            ]
            for v in built.versions.values()
        ]
    # Everything but the model layer is shared: the serving layer adds nothing to a version.
    assert layers[0][:-1] == layers[1][:-1] == layers[2][:-1]
    assert len({tuple(layer[-1:]) for layer in layers}) == 3
    mlflow = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for version in built.versions.values():
        detail = web.get(f"{built.service_url}/builds/{version.job['id']}").json()
        assert detail["v2_model"] == built.model_name
        assert detail["modelcar"].startswith(f"{built.repository}@sha256:")
        tags = wait_for_tag(mlflow, built.model_name, version.number, "mlflow_dock.modelcar")
        assert tags["mlflow_dock.modelcar"] == detail["modelcar"]
        encoded = built.model_name.replace(" ", "%20")
        assert (
            f"POST /v2/models/{encoded}/versions/{version.number}/infer"
            in (tags["mlflow_dock.endpoints"])
        )
    board = web.get(f"{built.service_url}/", params={"model": built.model_name}).text
    assert "POST /v2/models/" in board and "KServe Modelcar" in board


def wait_for_tag(client: MlflowClient, model: str, version: str, key: str) -> dict[str, str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tags = client.get_model_version(model, version).tags
        if key in tags:
            return dict(tags)
        time.sleep(0.5)
    raise AssertionError(f"{key} never written to {model} v{version}")


def test_modelcars_share_the_model_blobs_and_cost_a_config_and_a_manifest(built, registry):
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        for kind, version in built.versions.items():
            image = json.loads(client.get_manifest(built.path, version.number).body)
            car = client.get_manifest(built.path, naming.modelcar_tag(version.number))
            assert version.job["modelcar"] == f"{built.repository}@{car.digest}"
            document = json.loads(car.body)
            assert document["layers"][1:] == [
                {k: d[k] for k in ("mediaType", "digest", "size")} for d in image["layers"][-1:]
            ], kind
            assert len(car.body) + document["config"]["size"] < 10_000
        busyboxes = {
            json.loads(client.get_manifest(built.path, naming.modelcar_tag(v.number)).body)[
                "layers"
            ][0]["digest"]
            for v in built.versions.values()
        }
    assert len(busyboxes) == 1


def test_a_modelcar_runs_as_kserves_sidecar_as_a_non_root_user(built, docker_client, registry):
    image = built.modelcar("sklearn")
    docker_client.images.pull(image, auth_config=registry.auth_config)
    # KServe's init container, then its sidecar's link, as uid 1000 (not the image's user).
    script = (
        '[ -d /models ] && [ "$(ls -A /models)" ] && echo prefetched'
        " && ln -sf /proc/$$/root/models /tmp/m && cat /tmp/m/MLmodel && sleep 1"
    )
    output = docker_client.containers.run(
        image, ["sh", "-c", script], user="1000:1000", remove=True
    ).decode()
    assert output.startswith("prefetched\n")
    assert "flavors:" in output and "sklearn" in output


def test_a_modelcar_serves_through_a_server_image_as_kserve_pairs_them(
    built, docker_client, registry, tmp_path
):
    """Version 3's Modelcar beside version 1's image: the server must answer with the params
    model it reads through /mnt/models, not the scikit-learn model baked into its image."""
    car_image = built.modelcar("params")
    docker_client.images.pull(car_image, auth_config=registry.auth_config)
    shared = tmp_path / "mnt"
    shared.mkdir()
    shared.chmod(0o777)  # an emptyDir both containers write to
    car = docker_client.containers.run(
        car_image,
        ["sh", "-c", "ln -sf /proc/$$/root/models /mnt/models && sleep infinity"],
        detach=True,
        volumes={str(shared): {"bind": "/mnt", "mode": "rw"}},
    )
    try:
        version = built.versions["params"]
        environment = {
            "__pyfunc_model_path__": "/mnt/models",
            "MLFLOW_DOCK_V2_MODEL_NAME": built.model_name,
            "MLFLOW_DOCK_V2_MODEL_VERSION": version.number,
        }
        with running(
            docker_client,
            registry,
            built.image("sklearn"),
            environment=environment,
            pid_mode=f"container:{car.id}",
            volumes={str(shared): {"bind": "/mnt", "mode": "rw"}},
        ) as server:
            answer = infer_with_tritonclient(
                server.url,
                built.model_name,
                {"a": np.array([1.0, 2.0])},
                version=version.number,
                parameters={"scale": 2.0, "tag": "xy"},
            )
            (output,) = answer.outputs
            assert answer.outputs[output].tolist() == [4.0, 6.0]
            assert invocations(
                server.url, {"dataframe_split": {"columns": ["a"], "data": [[1.0]]}}
            ) == [2.0]
    finally:
        car.remove(force=True)
        subprocess.run(["rm", "-rf", str(shared)], check=False)
