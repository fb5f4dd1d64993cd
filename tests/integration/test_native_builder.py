"""MLFLOW_DOCK_BUILDER=native against real parts: images assembled from wheels in the registry.

The service under test has no Docker Engine (DOCKER_HOST points at a socket that does not
exist), so every image here was built without one; the test process's own engine only pulls
and runs the result. The base image reaches the test registry once per session, pushed by the
docker SDK as fixture setup (a user's base image is in their registry already).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import json
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from mlflow_dock.imaging.dockerfile import serving_requirements
from mlflow_dock.imaging.elf import parse_elf
from mlflow_dock.imaging.native import NativeBuilder, NativeConfig, NativeInputs
from mlflow_dock.imaging.wheels import Platform
from mlflow_dock.mlflow.client import MlflowSource
from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support import web
from support.images import copy_image, push_rootfs, put_index
from support.jobs import build_of, invoke, job_detail, wait_for_job
from support.servers import SYSTEM_CA_BUNDLE, RegistryServer, log_sklearn_model

SUPPORT_DIR = Path(__file__).resolve().parent.parent / "support"

pytestmark = pytest.mark.integration

NO_ENGINE = "unix:///nonexistent/mlflow-dock-test/docker.sock"
DEFAULT_PACKAGES = ("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")


def pinned(*extra: str) -> list[str]:
    """log_model.py's default requirements, plus ``extra``."""
    return [f"{d}=={importlib.metadata.version(d)}" for d in DEFAULT_PACKAGES] + list(extra)


def _client(registry: RegistryServer) -> RegistryClient:
    return RegistryClient(registry.host, username=registry.username, password=registry.password)


def _manifest(registry: RegistryServer, path: str, reference: str) -> dict:
    with _client(registry) as client:
        return json.loads(client.get_manifest(path, reference).body)


def _config(registry: RegistryServer, path: str, manifest: dict) -> dict:
    with _client(registry) as client:
        return json.loads(client.get_blob(path, manifest["config"]["digest"]))


def blob_uploads(registry: RegistryServer, path: str) -> set[str]:
    """Digests of the blobs uploaded into ``path`` as the registry logged them (final PUTs)."""
    pattern = re.compile(
        r'msg="response completed".*http\.request\.method=PUT .*http\.request\.uri="/v2/'
        + re.escape(path)
        + r"/blobs/uploads/[^\"]*[?&]digest=sha256%3A([0-9a-f]{64})"
    )
    lines = registry.log_path.read_text().splitlines()
    return {"sha256:" + m.group(1) for line in lines if (m := pattern.search(line))}


def test_native_images_without_an_engine_share_package_layers_across_fresh_services(
    service_factory,
    webhook_factory,
    mlflow_client,
    mlflow_server,
    registry,
    docker_client,
    registry_base_image,
):
    """A second, fresh service (its own data directory, empty store and uv cache) building a
    different model mounts the packages the first service pushed, from the registry's cache."""
    suffix = str(time.time_ns())[-8:]
    # Its own namespace, so its layer cache repository starts empty.
    namespace = f"layer-cache-{suffix}"
    settings = {
        "MLFLOW_DOCK_BUILDER": "native",
        "MLFLOW_DOCK_BASE_IMAGE": registry_base_image,
        "DOCKER_HOST": NO_ENGINE,
        "MLFLOW_DOCK_SMOKE_TEST": "false",
        "MLFLOW_DOCK_IMAGE_NAMESPACE": namespace,
        # The fresh service must build model B only, not catch up on model A.
        "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
    }
    service = service_factory(**settings)
    webhook = webhook_factory(f"{service.url}/webhook", service_factory.secret)
    first, second = f"Native A {suffix}", f"Native B {suffix}"

    version = log_sklearn_model(mlflow_server.url, first)
    job = wait_for_job(service, build_of(first, version))
    assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]
    log = "\n".join(job_detail(service, job["id"])["log_tail"])
    assert "without an engine" in log

    path_a = f"{namespace}/{naming.repository_name(first)}"
    manifest_a = _manifest(registry, path_a, version)
    config_a = _config(registry, path_a, manifest_a)
    assert config_a["config"]["User"] == "10001:10001"
    assert config_a["history"][-1]["created_by"].startswith("COPY model/ /opt/ml/model/")
    packages_a = sum("uv pip install" in h.get("created_by", "") for h in config_a["history"])
    # Every package layer, the virtualenv's and the model server's is in the cache repository,
    # one tag each.
    cache_tags = _tags(registry, f"{namespace}/mlflow-dock-cache")
    assert len([t for t in cache_tags if t.startswith("gzip-")]) == packages_a + 2

    # The pushed image serves, as uid 10001, from its hand-made virtualenv.
    image = f"{registry.host}/{path_a}:{version}"
    docker_client.images.pull(image, auth_config=registry.auth_config)
    response = invoke(docker_client, image)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [0, 2]

    # A fresh service, nothing shared with the first but the registry (and MLflow).
    service.stop()
    mlflow_client.delete_webhook(webhook.webhook_id)
    fresh = service_factory(**settings)
    webhook_factory(f"{fresh.url}/webhook", service_factory.secret)
    # A second model with one more package: only that package, its model and config go up.
    version_b = log_sklearn_model(
        mlflow_server.url, second, pip_requirements=pinned("tabulate==0.9.0")
    )
    job_b = wait_for_job(fresh, build_of(second, version_b))
    log_b = "\n".join(job_detail(fresh, job_b["id"])["log_tail"])
    assert job_b["state"] == "succeeded", log_b
    counted = re.search(
        r"(\d+) blob\(s\) uploaded, (\d+) mounted, (\d+) already there; (\d+) layer\(s\) "
        r"packed, (\d+) found in the registry's layer cache",
        log_b,
    )
    assert counted is not None, log_b
    uploaded, mounted, _present, packed, cached = map(int, counted.groups())
    # Uploaded: tabulate's layer, the model layer, the config. Packed: tabulate only.
    assert (uploaded, packed, cached) == (3, 1, packages_a + 2), log_b
    assert mounted >= cached

    path_b = f"{namespace}/{naming.repository_name(second)}"
    manifest_b = _manifest(registry, path_b, version_b)
    layers_a = {layer["digest"] for layer in manifest_a["layers"]}
    layers_b = [layer["digest"] for layer in manifest_b["layers"]]
    new = [digest for digest in layers_b if digest not in layers_a]
    config_b = _config(registry, path_b, manifest_b)
    steps = [h.get("created_by", "") for h in config_b["history"] if not h.get("empty_layer")]
    new_steps = [steps[layers_b.index(digest)] for digest in new]
    assert len(new) == 2, new_steps  # tabulate's layer and the model layer
    assert any("tabulate==0.9.0" in step for step in new_steps), new_steps
    # The registry agrees: of the image's blobs only tabulate's layer, the model layer and the
    # config were uploaded; everything else was mounted. (SBOMs attached beside it not counted.)
    image_blobs = {manifest_b["config"]["digest"], *layers_b}
    assert blob_uploads(registry, path_b) & image_blobs == {manifest_b["config"]["digest"], *new}


def _tags(registry: RegistryServer, path: str) -> list[str]:
    response = web.get(f"{registry.url}/v2/{path}/tags/list", auth=registry.auth, timeout=10)
    response.raise_for_status()
    return list(response.json().get("tags") or [])


def test_requirement_the_native_builder_cannot_serve_fails_at_once_without_an_engine(
    service_factory, webhook_factory, mlflow_server, registry_base_image
):
    service = service_factory(
        MLFLOW_DOCK_BUILDER="native",
        MLFLOW_DOCK_BASE_IMAGE=registry_base_image,
        DOCKER_HOST=NO_ENGINE,
        MLFLOW_DOCK_SMOKE_TEST="false",
        MLFLOW_DOCK_MAX_ATTEMPTS="1",
        # Its own namespace: a derived base with libgomp1 that another test pushed would
        # otherwise (rightly) be reused without an engine.
        MLFLOW_DOCK_IMAGE_NAMESPACE=f"no-engine-{time.time_ns()}",
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    name = f"Native lightgbm {str(time.time_ns())[-8:]}"
    # lightgbm's wheel needs libgomp.so.1, which the minbase test image does not have.
    version = log_sklearn_model(mlflow_server.url, name, pip_requirements=pinned("lightgbm"))
    job = wait_for_job(service, build_of(name, version), timeout=300)
    assert job["state"] == "failed"
    error = job["error"]
    assert "lightgbm" in error and "libgomp.so.1" in error, error
    assert "MLFLOW_DOCK_BASE_IMAGE" in error and "DOCKER_HOST" in error, error
    assert "\n" not in error.strip()


def test_missing_os_library_becomes_a_derived_base_and_the_rest_stays_native(
    service_factory, webhook_factory, mlflow_server, registry, docker_client
):
    # The default builder (native) with an engine; the base is the conftest's registry copy.
    service = service_factory(MLFLOW_DOCK_BUILD_NETWORK="host", MLFLOW_DOCK_SMOKE_TEST="false")
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    name = f"Native derived base {str(time.time_ns())[-8:]}"
    version = log_sklearn_model(mlflow_server.url, name, pip_requirements=pinned("lightgbm"))
    job = wait_for_job(service, build_of(name, version), timeout=300)
    log = "\n".join(job_detail(service, job["id"])["log_tail"])
    assert job["state"] == "succeeded", log
    assert "adding Debian package(s) libgomp1" in log and "without an engine" in log, log
    assert "building runtime image" not in log and "building with the engine" not in log, log

    # The image is the derived base (base layers + one apt layer) plus native layers on top.
    path = naming.repository_name(name)
    manifest = _manifest(registry, path, version)
    derived = re.search(
        rf"pushed derived base {re.escape(registry.host)}/(\S+?):(os-[0-9a-f]+)@", log
    )
    assert derived is not None, log
    derived_manifest = _manifest(registry, derived.group(1), derived.group(2))
    base_layers = [layer["digest"] for layer in derived_manifest["layers"]]
    assert [layer["digest"] for layer in manifest["layers"]][: len(base_layers)] == base_layers

    # libgomp is really there: lightgbm's extension loads in the published image.
    image = f"{registry.host}/{path}:{version}"
    docker_client.images.pull(image, auth_config=registry.auth_config)
    output = docker_client.containers.run(
        image, ["python", "-c", "import lightgbm; print(lightgbm.__version__)"], remove=True
    )
    assert output.strip()


def test_requirement_without_a_wheel_goes_to_the_engine_when_there_is_one(
    service_factory, webhook_factory, mlflow_server, registry, docker_client, registry_base_image
):
    service = service_factory(
        MLFLOW_DOCK_BUILDER="native",
        MLFLOW_DOCK_BASE_IMAGE=registry_base_image,
        MLFLOW_DOCK_BUILD_NETWORK="host",
        MLFLOW_DOCK_SMOKE_TEST="false",
        # Source distributions are refused by default (their setup.py runs at build time).
        MLFLOW_DOCK_ALLOW_SDISTS="true",
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    name = f"Native sdist {str(time.time_ns())[-8:]}"
    # docopt 0.6.2 exists only as an sdist: no wheel for any platform.
    version = log_sklearn_model(mlflow_server.url, name, pip_requirements=pinned("docopt==0.6.2"))
    job = wait_for_job(service, build_of(name, version))
    log = "\n".join(job_detail(service, job["id"])["log_tail"])
    assert job["state"] == "succeeded", log
    assert "docopt" in log and "building with the engine" in log
    image = f"{registry.host}/{naming.repository_name(name)}:{version}"
    docker_client.images.pull(image, auth_config=registry.auth_config)
    response = invoke(docker_client, image)
    assert response.status_code == 200, response.text


# Its two users share one xdist worker (group "multiarch-base"): making it takes minutes.
@pytest.fixture(scope="session")
def multiarch_base_image(registry: RegistryServer, registry_base_image: str) -> str:
    """An index over the amd64 test base and a foreign-built arm64 one, via the registry API."""
    proc = subprocess.run(
        ["bash", str(SUPPORT_DIR / "build-arm64-rootfs.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rootfs = Path(proc.stdout.strip().splitlines()[-1])
    amd64_path, _, amd64_tag = registry_base_image.partition("/")[2].partition(":")
    repository = "mlflow-dock-test/base-multi"
    with _client(registry) as client:
        amd64 = copy_image(client, amd64_path, amd64_tag, repository)
        arm64 = push_rootfs(client, rootfs, repository, architecture="arm64")
        put_index(client, repository, "bookworm", {"amd64": amd64, "arm64": arm64})
    return f"{registry.host}/{repository}:bookworm"


def _elf_machines(blob: bytes) -> dict[str, str]:
    """ELF machine of every shared object in a gzip layer blob."""
    machines = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        for member in tar:
            if member.isfile() and ".so" in member.name:
                file = tar.extractfile(member)
                info = parse_elf(file.read()) if file is not None else None
                if info is not None:
                    machines[member.name] = info.machine
    return machines


def _check_multiarch(registry: RegistryServer, docker_client, path: str, tag: str) -> None:
    """The index lists both platforms, arm64 carries only aarch64 ELFs, amd64 serves."""
    index = _manifest(registry, path, tag)
    platforms = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    assert set(platforms) == {"amd64", "arm64"}
    arm64 = _manifest(registry, path, platforms["arm64"])
    config = _config(registry, path, arm64)
    assert config["architecture"] == "arm64"
    steps = [h.get("created_by", "") for h in config["history"] if not h.get("empty_layer")]
    machines: dict[str, str] = {}
    with _client(registry) as client:
        for layer, step in zip(arm64["layers"], steps, strict=True):
            if step.startswith("uv pip install"):
                machines.update(_elf_machines(client.get_blob(path, layer["digest"])))
    assert any("numpy" in name for name in machines)
    assert set(machines.values()) == {"aarch64"}, {
        n: m for n, m in machines.items() if m != "aarch64"
    }
    # The engine picks the amd64 image from the index; it serves.
    image = f"{registry.host}/{path}:{tag}"
    docker_client.images.pull(image, auth_config=registry.auth_config)
    response = invoke(docker_client, image)
    assert response.status_code == 200, response.text


@pytest.mark.xdist_group("multiarch-base")
def test_native_builder_writes_an_index_with_aarch64_wheels_on_the_arm64_base(
    mlflow_server, registry, docker_client, multiarch_base_image, tmp_path
):
    name = f"Native multiarch direct {str(time.time_ns())[-8:]}"
    version = log_sklearn_model(mlflow_server.url, name)
    model_dir = MlflowSource(mlflow_server.url).download(name, version, tmp_path / "model").path
    path = naming.repository_name(name)
    with _client(registry) as client:
        builder = NativeBuilder(
            NativeConfig(
                platforms=(Platform.parse("linux/amd64"), Platform.parse("linux/arm64")),
                cache_dir=tmp_path / "cache",
                ca_bundle=SYSTEM_CA_BUNDLE.read_bytes() if SYSTEM_CA_BUNDLE.exists() else None,
            ),
            registry_factory=lambda _host: client,
        )
        result = builder.write_image(
            client,
            path,
            NativeInputs(
                base_image=multiarch_base_image,
                model_dir=model_dir,
                python_version="3.11",
                requirements=serving_requirements((model_dir / "requirements.txt").read_text()),
                labels={},
                work=tmp_path / "work",
                log=print,
            ),
            base_registry=client,
        )
        result.tag(client, version)
    assert set(result.platform_digests) == {"linux/amd64", "linux/arm64"}
    _check_multiarch(registry, docker_client, path, version)


@pytest.mark.xdist_group("multiarch-base")
def test_two_platforms_publish_an_index_through_the_service(
    service_factory,
    webhook_factory,
    mlflow_server,
    registry,
    docker_client,
    multiarch_base_image,
):
    service = service_factory(
        MLFLOW_DOCK_BUILDER="native",
        MLFLOW_DOCK_BASE_IMAGE=multiarch_base_image,
        MLFLOW_DOCK_PLATFORMS="linux/amd64,linux/arm64",
        DOCKER_HOST=NO_ENGINE,
        MLFLOW_DOCK_SMOKE_TEST="false",
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)
    name = f"Native multiarch {str(time.time_ns())[-8:]}"
    version = log_sklearn_model(mlflow_server.url, name)
    job = wait_for_job(service, build_of(name, version))
    assert job["state"] == "succeeded", job_detail(service, job["id"])["log_tail"]
    _check_multiarch(registry, docker_client, naming.repository_name(name), version)
