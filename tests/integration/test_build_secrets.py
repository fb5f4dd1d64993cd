"""Index credentials and the build CA bundle reach the installer, and nothing published; the same
builds prove what the engine builders' images are.

A private index (PyPI behind basic auth on loopback, tests/support/pyindex.py) whose URL carries
a recognisable token, and a CA bundle with a recognisable marker line, are configured; each
builder (native, layered, MLflow's stock) builds through the service once per module, in a
module fixture (`native_build`, `layered_build`, `stock_build`). The index must have seen the
token (it refuses requests without it), and then every blob of everything in the target
repository (image configs with their history, every layer decompressed, SBOM and signature
artifacts) is read back from the registry and searched for the token and the marker, as are the
jobs' logs and records, the service's log and its data directory.

An engine build costs minutes (MLflow's stock one installs full mlflow and nginx from scratch,
the suite's slowest build), so the engine builders' end-to-end checks use these same builds
instead of making their own:

- stock (MLFLOW_DOCK_BUILDER=mlflow), smoke test on: MLflow's real webhook -> MLflow's stock
  Dockerfile -> smoke test -> registry -> a serving container pulled afresh (nginx in front),
  MLflow's stock steps in the image's own history;
- layered: pip used the index and masked its password; no build-only input (pip.conf, the CA
  bundle, the build directory) is in the image's history, config or filesystem; the image runs
  mlflow-dock's server (V2) as its version, and so does the next version, assembled in the
  registry on the engine-built one.

Each engine builder's tests share one `xdist_group`, so one worker makes that builder's build.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest

from mlflow import MlflowClient
from mlflow_dock.oci import reference as naming
from support import web
from support.jobs import (
    build_of,
    created_payload,
    invoke,
    job_detail,
    serving_on_host_network,
    signed_delivery,
    wait_for_job,
)
from support.pyindex import PrivateIndex, start_private_index
from support.servers import SYSTEM_CA_BUNDLE, log_sklearn_model

pytestmark = pytest.mark.integration

# Each builder's build is a module fixture: its tests must run on one worker, or every worker
# that draws one of them builds it again.
LAYERED = pytest.mark.xdist_group("build-secrets-layered")
STOCK = pytest.mark.xdist_group("build-secrets-stock")
# The stock build (full mlflow and nginx from scratch, then its smoke test) is paid for in the
# setup of the first stock test: 6.4-7.5 min there (the worker's MLflow server and registry
# starting included) with only this module's and test_image_quality.py's tests on 2 CPUs; under
# the whole suite's load, 12.7 min were measured for it without its smoke test.
STOCK_BUILD_TIMEOUT = 1200
STOCK_TEST_TIMEOUT = pytest.mark.timeout(STOCK_BUILD_TIMEOUT + 600)

_MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


@dataclass
class Build:
    """One builder's build(s) through the private index, finished and checked to succeed."""

    builder: str
    service: Any
    model_name: str
    token: str  # the index's
    marker: str  # the CA bundle's
    index_requests: int  # the index's authorized requests during the builds
    jobs: list[dict[str, Any]] = field(default_factory=list)  # in version order
    details: list[dict[str, Any]] = field(default_factory=list)  # GET /builds/{id}, long logs


@pytest.fixture(scope="module")
def private_index() -> Iterator[PrivateIndex]:
    index = start_private_index(SYSTEM_CA_BUNDLE)
    yield index
    index.stop()


def _marked_ca_bundle(directory: Path) -> tuple[Path, str]:
    """The system CA bundle plus a comment line no image may contain (PEM readers skip it)."""
    marker = f"mlflow-dock-ca-marker-{secrets.token_hex(8)}"
    path = directory / "build-ca.pem"
    path.write_text(SYSTEM_CA_BUNDLE.read_text() + f"\n# {marker}\n")
    return path, marker


def _start(
    builder: str,
    factory: Any,
    index: PrivateIndex,
    tmp_path_factory: pytest.TempPathFactory,
    **overrides: str,
) -> tuple[Any, str]:
    """A service building with `builder` through the private index and a marked CA bundle."""
    ca_bundle, marker = _marked_ca_bundle(tmp_path_factory.mktemp(f"{builder}-ca"))
    service = factory(
        MLFLOW_DOCK_BUILDER=builder,
        MLFLOW_DOCK_PIP_INDEX_URL=index.url,
        MLFLOW_DOCK_BUILD_CA_BUNDLE=str(ca_bundle),
        MLFLOW_DOCK_BUILD_NETWORK="host",  # the private index listens on loopback
        MLFLOW_DOCK_ENGINE_FALLBACK="false",  # native must stay native
        **overrides,
    )
    return service, marker


def _model_name(builder: str) -> str:
    # Spaces and capitals, as real names have.
    return f"Dock Secrets {builder.title()} {uuid.uuid4().hex[:8]}"


def _deliver_and_wait(service: Any, secret: str, model_name: str, version: str) -> dict[str, Any]:
    """A signed `model_version.created` delivery for the version, then its finished job."""
    answer = signed_delivery(service, secret, created_payload(model_name, version))
    assert answer.status_code == 202, answer.text
    return wait_for_job(service, build_of(model_name, version))


def _finished(build: Build, job: dict[str, Any]) -> None:
    detail = job_detail(build.service, job["id"], log_lines=5000)
    assert job["state"] == "succeeded", (job, detail["log_tail"][-40:])
    build.jobs.append(job)
    build.details.append(detail)


def _engine_free_or_layered(
    builder: str,
    versions: int,
    factory: Any,
    mlflow_server: Any,
    index: PrivateIndex,
    tmp_path_factory: pytest.TempPathFactory,
) -> Build:
    """`versions` versions of one model built with `builder`, smoke test off."""
    service, marker = _start(
        builder,
        factory,
        index,
        tmp_path_factory,
        MLFLOW_DOCK_SMOKE_TEST="false",  # what the images serve is checked by the tests
    )
    seen_before = len(index.authorized)
    name = _model_name(builder)
    build = Build(builder, service, name, index.token, marker, 0)
    for _ in range(versions):
        version = log_sklearn_model(mlflow_server.url, name)
        _finished(build, _deliver_and_wait(service, factory.secret, name, version))
    build.index_requests = len(index.authorized) - seen_before
    return build


@pytest.fixture(scope="module")
def native_build(
    module_service_factory: Any,
    mlflow_server: Any,
    private_index: PrivateIndex,
    tmp_path_factory: pytest.TempPathFactory,
) -> Build:
    return _engine_free_or_layered(
        "native", 1, module_service_factory, mlflow_server, private_index, tmp_path_factory
    )


@pytest.fixture(scope="module")
def layered_build(
    module_service_factory: Any,
    mlflow_server: Any,
    private_index: PrivateIndex,
    tmp_path_factory: pytest.TempPathFactory,
) -> Build:
    """Two versions: the first built by the engine, the second assembled in the registry on it."""
    return _engine_free_or_layered(
        "layered", 2, module_service_factory, mlflow_server, private_index, tmp_path_factory
    )


@pytest.fixture(scope="module")
def stock_build(
    module_service_factory: Any,
    mlflow_server: Any,
    private_index: PrivateIndex,
    tmp_path_factory: pytest.TempPathFactory,
) -> Build:
    """A stock build with its smoke test, triggered by MLflow's own webhook."""
    service, marker = _start("mlflow", module_service_factory, private_index, tmp_path_factory)
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    hook = client.create_webhook(
        name=f"stock-{uuid.uuid4().hex[:8]}",
        url=f"{service.url}/webhook",
        events=["model_version.created"],
        secret=module_service_factory.secret,
    )
    try:
        time.sleep(2)  # MLflow caches the webhook list (TTL 1 s in the fixture server)
        seen_before = len(private_index.authorized)
        name = _model_name("stock")
        version = log_sklearn_model(mlflow_server.url, name)
        job = wait_for_job(service, build_of(name, version), timeout=STOCK_BUILD_TIMEOUT)
    finally:
        # Webhooks are global to the server: this one would fire for every later version.
        client.delete_webhook(hook.webhook_id)
    build = Build("mlflow", service, name, private_index.token, marker, 0)
    _finished(build, job)
    build.index_requests = len(private_index.authorized) - seen_before
    return build


# --------------------------------------------------------------------------- build secrets


def _blobs(registry: Any, repository: str) -> Iterator[tuple[str, bytes]]:
    """("manifest|config|layer ...", bytes) of everything reachable from every tag."""
    with httpx.Client(base_url=registry.url, auth=registry.auth, timeout=120) as client:
        tags = client.get(f"/v2/{repository}/tags/list").raise_for_status().json()["tags"]
        pending = list(tags)
        seen: set[str] = set()
        while pending:
            reference = pending.pop()
            answer = client.get(
                f"/v2/{repository}/manifests/{reference}", headers={"Accept": _MANIFEST_TYPES}
            ).raise_for_status()
            digest = answer.headers["Docker-Content-Digest"]
            if digest in seen:
                continue
            seen.add(digest)
            yield f"manifest {reference}", answer.content
            manifest = json.loads(answer.content)
            pending.extend(child["digest"] for child in manifest.get("manifests", []))
            blobs = [("config", manifest.get("config"))]
            blobs += [("layer", layer) for layer in manifest.get("layers", [])]
            for kind, blob in blobs:
                if blob and blob["digest"] not in seen:
                    seen.add(blob["digest"])
                    data = client.get(f"/v2/{repository}/blobs/{blob['digest']}").content
                    yield f"{kind} {blob['digest']} of {reference}", _decompressed(data)


def _decompressed(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        pytest.fail("a zstd blob: this test reads gzip and plain blobs only")
    return data


def _files_containing(root: Path, needles: tuple[bytes, ...]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            if any(needle in data for needle in needles):
                found.append(str(path))
    return found


@pytest.fixture
def build(request: pytest.FixtureRequest) -> Build:
    """The module's build by the builder ``request.param`` names (parametrize it indirectly)."""
    fixture = {"native": "native_build", "layered": "layered_build", "mlflow": "stock_build"}
    built: Build = request.getfixturevalue(fixture[request.param])
    return built


@pytest.mark.parametrize(
    "build",
    [
        "native",
        pytest.param("layered", marks=LAYERED),
        pytest.param("mlflow", marks=[STOCK, STOCK_TEST_TIMEOUT]),
    ],
    indirect=True,
)
def test_index_credentials_and_ca_bundle_are_in_nothing_published(
    build: Build, registry: Any
) -> None:
    builder, service, model_name = build.builder, build.service, build.model_name
    # The installer used the credentials (the index refuses requests without them).
    assert build.index_requests > 0

    needles = (build.token.encode(), build.marker.encode())
    blobs = list(_blobs(registry, naming.repository_name(model_name)))
    for what, data in blobs:
        assert not any(needle in data for needle in needles), f"{builder}: secret in {what}"
    # The search sees what it must: the model's files in a layer, the labels in the config.
    assert any(b"python_function" in data for what, data in blobs if what.startswith("layer"))
    assert any(model_name.encode() in data for what, data in blobs if what.startswith("config"))

    texts = [service.log_text()]
    for detail in build.details:
        texts += ["\n".join(detail["log_tail"]), json.dumps(detail)]
    for params in ({"model": model_name}, {}):
        texts.append(web.get(f"{service.url}/builds", params=params, timeout=10).text)
    for text in texts:
        assert build.token not in text and build.marker not in text
    # The service's files: job store, work directories, and the (shared) uv cache.
    for directory in ("MLFLOW_DOCK_DATA_DIR", "MLFLOW_DOCK_CACHE_DIR"):
        if directory in service.env:
            assert _files_containing(Path(service.env[directory]), needles) == []


# --------------------------------------------------------------------------- stock builder


def _seconds(job: dict[str, Any], start: str, end: str) -> float:
    def parse(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    return parse(job[end]) - parse(job[start])


def _predict_on_host_port(docker_client: Any, image: str) -> list[Any]:
    """Run the image as platforms do (host network, $PORT injected) and ask for predictions."""
    response = invoke(docker_client, image)
    assert response.status_code == 200, response.text
    # Stock serving: nginx in front, as MLflow documents it.
    assert "nginx" in response.headers.get("server", ""), response.headers
    return list(response.json()["predictions"])


@STOCK
@STOCK_TEST_TIMEOUT
def test_mlflow_builder_pushes_mlflows_stock_image(
    stock_build: Build, registry: Any, docker_client: Any
) -> None:
    model_name = stock_build.model_name
    job, detail = stock_build.jobs[0], stock_build.details[0]
    version = job["version"]
    build_seconds = _seconds(job, "started_at", "finished_at")
    print(f"stock build (download, build, smoke test, push): {build_seconds:.0f} s")
    log = "\n".join(detail["log_tail"])
    assert "smoke test passed" in log
    assert registry.password not in log

    repository = f"{registry.host}/{naming.repository_name(model_name)}"
    image = f"{repository}:{version}"
    assert job["image"] == image and job["digest"].startswith("sha256:")

    # What users get is what the registry holds: pull it afresh.
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(image, force=True, noprune=True)
    docker_client.images.pull(image, auth_config=registry.auth_config)
    assert _predict_on_host_port(docker_client, image) == [0, 2]

    pulled = docker_client.images.get(image)
    steps = "\n".join(str(layer.get("CreatedBy", "")) for layer in pulled.history())
    # MLflow's stock steps, in the image's own history.
    assert "apt-get install -y --no-install-recommends nginx" in steps
    assert "pip install mlflow==" in steps
    assert "C._install_pyfunc_deps('/opt/ml/model'" in steps
    assert "MLFLOW_DISABLE_ENV_CREATION=True" in steps
    # The documented trade-off: build inputs are deleted in a later layer (history keeps it).
    assert "rm -rf /tmp/mlflow-dock-build" in steps
    assert pulled.labels["io.mlflow-dock.model.version"] == version
    assert pulled.labels["io.mlflow-dock.model.name"] == model_name


# --------------------------------------------------------------------------- layered builder


@LAYERED
def test_index_credentials_and_ca_bundle_stay_out_of_the_layered_image(
    layered_build: Build, private_index: PrivateIndex, docker_client: Any
) -> None:
    job = layered_build.details[0]  # the engine-built version
    token = layered_build.token
    # pip used the configured index (and masked its password itself); that nothing of ours
    # wrote the token anywhere the user can read is the test above, on this same build.
    masked = private_index.url.replace(f":{token}@", ":****@")
    assert f"Looking in indexes: {masked}" in "\n".join(job["log_tail"])

    image = docker_client.images.get(job["image"])
    steps = "\n".join(step["CreatedBy"] for step in image.history())
    assert "/opt/ml/model" in steps and "/opt/mlflow-dock/venv" in steps
    assert token not in steps
    assert "ca-bundle.crt" not in steps and "mlflow-dock-build" not in steps
    listing = docker_client.containers.run(
        job["image"],
        ["sh", "-c", "ls -a /tmp; ls /opt/mlflow-dock; cat /etc/pip.conf 2>/dev/null; true"],
        remove=True,
        network_mode="host",
    ).decode()
    assert "mlflow-dock-build" not in listing and token not in listing
    config = json.dumps(image.attrs["Config"])
    assert token not in config and "PIP_CONFIG_FILE" not in config


@LAYERED
def test_layered_images_answer_v2_as_their_version_also_when_assembled(
    layered_build: Build, docker_client: Any, registry: Any
) -> None:
    """The engine's images run mlflow-dock's server as their version (ENV after the model), and
    so does the next version, assembled in the registry on the engine-built one."""
    model_name = layered_build.model_name
    built, assembled = layered_build.details
    assert any("assembled" in line for line in assembled["log_tail"]), assembled["log_tail"]
    for job in (built, assembled):
        assert job["v2_model"] == model_name
        _assert_answers_v2(docker_client, registry, job["image"], model_name, job["version"])


def _assert_answers_v2(
    docker_client: Any, registry: Any, image: str, model_name: str, version: str
) -> None:
    docker_client.images.pull(image, auth_config=registry.auth_config)
    with serving_on_host_network(docker_client, image, "/v2/health/ready") as url:
        metadata = web.get(f"{url}/v2/models/{model_name}/versions/{version}", timeout=10)
        assert metadata.status_code == 200, metadata.text
        assert metadata.json()["versions"] == [version]
        assert web.get(f"{url}/ping", timeout=10).status_code == 200
