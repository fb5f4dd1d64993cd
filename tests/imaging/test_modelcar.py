"""KServe Modelcars (imaging/modelcar.py): the busybox layer, the image, writing it to a registry.

The real thing (a Modelcar run as KServe runs it, beside the server reading through the link)
is tests/integration/test_open_inference.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mlflow_dock.errors import ConfigError
from mlflow_dock.imaging import modelcar
from mlflow_dock.imaging.builder import RUNTIME_KEY_LABEL
from mlflow_dock.oci.manifest import DOCKER_LAYER, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, Manifest
from support.elffiles import tiny_elf64
from support.registry import OciRegistry, sha256

REPO = "team/fraud-model"
MODEL_LAYER = b"model layer bytes"


def static_busybox(tmp_path: Path, machine: int = 62, needed=()) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(tiny_elf64(machine, list(needed)) + b"\0" * 64)
    return path


@pytest.fixture
def busybox(tmp_path: Path) -> modelcar.Busybox:
    return modelcar.busybox_from(static_busybox(tmp_path))


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {member.name: member for member in tar.getmembers()}


def test_the_busybox_layer_holds_what_kserve_runs_and_a_relative_models_link(busybox, tmp_path):
    found = members(busybox.data)
    assert found["bin/busybox"].mode == 0o755 and found["bin/busybox"].isfile()
    for applet in ("sh", "ln", "sleep", "ls", "mkdir"):
        assert found[f"bin/{applet}"].issym() and found[f"bin/{applet}"].linkname == "busybox"
    # Relative: resolved inside the Modelcar through /proc/<pid>/root, not in the reader's root.
    assert found["models"].issym() and found["models"].linkname == "opt/ml/model"
    assert all(m.uid == 0 and m.mtime == 0 for m in found.values())
    assert busybox.platform == "linux/amd64"
    # Deterministic: one blob for every version of every model.
    assert modelcar.busybox_from(static_busybox(tmp_path)).layer == busybox.layer


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it"),
        (b"#!/bin/sh\n", "not an ELF"),
        (tiny_elf64(62, ["libc.so.6"]) + b"\0" * 64, "dynamically linked .*libc.so.6"),
        (tiny_elf64(21, []) + b"\0" * 64, "built for ppc64"),
    ],
)
def test_an_unusable_busybox_is_a_one_line_config_error(tmp_path, content, message):
    path = tmp_path / "busybox"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"MLFLOW_DOCK_MODELCAR_BUSYBOX={path}: {message}"):
        modelcar.busybox_from(path)


def arm_busybox(tmp_path: Path) -> modelcar.Busybox:
    return modelcar.busybox_from(static_busybox(tmp_path, machine=183))


def served(
    *,
    last: tuple[str, ...] = ("COPY model/ /opt/ml/model/ # mlflow-dock native",),
    env: tuple[str, ...] = ("MLFLOW_DOCK_V2_MODEL_NAME=fraud model",),
    cmd: tuple[str, ...] = ("python", "-m", "mlflow_dock_serving"),
    layer_type: str = OCI_LAYER,
) -> modelcar.ServedImage:
    """A serving image: two runtime layers, then ``last`` (each a layer), then an ENV."""
    created_by = ["FROM base", "uv pip install numpy # mlflow-dock native", *last]
    layers = [
        {"mediaType": layer_type, "digest": f"sha256:{str(i) * 64}", "size": 10 + i}
        for i in range(len(created_by))
    ]
    config = {
        "created": "2026-06-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/opt/mlflow-dock/venv/bin:/bin", *env],
            "Cmd": list(cmd),
            "User": "10001:10001",
            "Labels": {RUNTIME_KEY_LABEL: "k", "io.mlflow-dock.model.version": "3"},
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": [f"sha256:{chr(97 + i) * 64}" for i in range(len(layers))],
        },
        "history": [
            *({"created_by": text} for text in created_by),
            {"created_by": "ENV MLFLOW_DOCK_V2_MODEL_NAME=fraud model", "empty_layer": True},
        ],
    }
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": layers}
    manifest = Manifest.from_bytes(json.dumps(document).encode(), OCI_MANIFEST)
    return modelcar.ServedImage(manifest, document, config)


def test_the_modelcar_is_the_busybox_layer_and_the_serving_image_s_model_layer(busybox):
    image = served()
    config_bytes, manifest = modelcar.modelcar_image(image, busybox)  # type: ignore[misc]
    document = json.loads(manifest.body)
    config = json.loads(config_bytes)
    assert [layer["digest"] for layer in document["layers"]] == [
        busybox.layer.digest,
        image.document["layers"][-1]["digest"],  # the very blob: shared, not copied
    ]
    assert config["rootfs"]["diff_ids"] == [
        busybox.layer.diff_id,
        image.config["rootfs"]["diff_ids"][-1],
    ]
    assert document["config"]["digest"] == sha256(config_bytes)
    container = config["config"]
    # The serving images' user: a server may only follow /proc/<pid>/root of its own user.
    assert container["User"] == "10001:10001" and container["Env"] == ["PATH=/bin"]
    assert "Entrypoint" not in container  # KServe's args are the whole command
    assert RUNTIME_KEY_LABEL not in container["Labels"]  # never assembled on
    assert container["Labels"]["io.mlflow-dock.model.version"] == "3"
    assert container["Labels"][modelcar.IMAGE_LABEL] == image.manifest.digest
    assert (config["architecture"], config["created"]) == ("amd64", "2026-06-01T00:00:00Z")
    assert len(config["history"]) == 2 and "COPY model/" in config["history"][1]["created_by"]
    # The same serving image always gives the same Modelcar (re-runs, adopted images).
    assert modelcar.modelcar_image(served(), busybox) == (config_bytes, manifest)
    # A config and a manifest: what each version adds to the registry.
    assert len(config_bytes) + len(manifest.body) < 10_000


def test_every_trailing_model_layer_is_shared_whatever_their_number(busybox):
    image = served(
        last=(
            "COPY model/ /opt/ml/model/ # mlflow-dock native",
            "COPY model/model.safetensors /opt/ml/model/model.safetensors # weights",
        ),
        layer_type=DOCKER_LAYER,
    )
    _, manifest = modelcar.modelcar_image(image, busybox)  # type: ignore[misc]
    layers = json.loads(manifest.body)["layers"]
    assert [layer["digest"] for layer in layers[1:]] == [
        layer["digest"] for layer in image.document["layers"][-2:]
    ]
    # Docker's gzip layer type becomes OCI's in an OCI manifest: the same bytes.
    assert {layer["mediaType"] for layer in layers} == {OCI_LAYER}


def test_an_image_whose_last_layer_is_not_the_model_gets_no_modelcar(busybox):
    # MLflow's stock image installs the model's requirements after copying it.
    stock = served(last=("COPY dir:abc in /opt/ml/model ", "RUN python -c install deps"))
    assert modelcar.modelcar_image(stock, busybox) is None


def test_the_v2_name_is_read_from_the_image_itself():
    assert modelcar.v2_model_of(served().config) == "fraud model"
    assert modelcar.v2_model_of(served(env=()).config) == "model"  # the server's default
    stock = served(cmd=("python", "/opt/mlflow-dock/serve.py"))
    assert modelcar.v2_model_of(stock.config) is None
    former = served(cmd=("sh", "-c", "exec uvicorn mlflow.pyfunc.scoring_server.app:app"))
    assert modelcar.v2_model_of(former.config) is None


def store_serving_image(registry: OciRegistry, repository: str = REPO) -> modelcar.ServedImage:
    """A serving image really stored: its model layer blob, config and manifest."""
    image = served()
    layer_digest = registry.put_blob(repository, MODEL_LAYER)
    image.document["layers"][-1] = {
        "mediaType": OCI_LAYER,
        "digest": layer_digest,
        "size": len(MODEL_LAYER),
    }
    config = json.dumps(image.config).encode()
    image.document["config"] = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": registry.put_blob(repository, config),
        "size": len(config),
    }
    body = json.dumps(image.document).encode()
    registry.put_manifest(repository, body, OCI_MANIFEST)
    manifest = Manifest.from_bytes(body, OCI_MANIFEST)
    return modelcar.ServedImage(manifest, image.document, image.config)


class Cache:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], object] = {}

    def get(self, host, key):  # type: ignore[no-untyped-def]
        return self.entries.get((host, key))

    def put(self, host, key, layer, *, label):  # type: ignore[no-untyped-def]
        self.entries[(host, key)] = layer


def test_publishing_costs_a_config_and_a_manifest_and_shares_the_busybox_blob(busybox):
    registry, cache = OciRegistry(), Cache()
    cars = modelcar.BusyboxModelcars(busybox, cache=cache)  # type: ignore[arg-type]
    image = store_serving_image(registry)
    log: list[str] = []
    with registry.client() as client:
        digest = cars.publish(client, REPO, image, "3-modelcar", log.append)
    assert registry.tags[(REPO, "3-modelcar")] == digest
    layers = registry.doc(REPO, "3-modelcar")["layers"]
    assert layers[1]["digest"] == image.document["layers"][-1]["digest"]
    assert registry.blobs[(REPO, busybox.layer.digest)] == busybox.data
    assert any("Modelcar team/fraud-model:3-modelcar" in line for line in log)

    # Another model's repository: the busybox blob is mounted from where it was pushed.
    other = "team/other-model"
    store_serving_image(registry, other)
    before = len(registry.writes())
    with registry.client() as client:
        cars.publish(client, other, store_serving_image(registry, other), "1-modelcar", log.append)
    posts = [path for method, path in registry.writes()[before:] if method == "POST"]
    assert len(posts) == 2  # the busybox mount, the config upload: no busybox upload
    assert registry.blobs[(other, busybox.layer.digest)] == busybox.data


def test_the_companions_read_an_index_for_the_busybox_platform(tmp_path, busybox):
    registry = OciRegistry()
    amd64 = store_serving_image(registry)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": amd64.manifest.digest,
                "size": len(amd64.manifest.body),
                "platform": {"os": "linux", "architecture": architecture},
            }
            for architecture in ("arm64", "amd64")
        ],
    }
    body = json.dumps(index).encode()
    registry.put_manifest(REPO, body, OCI_INDEX)
    with registry.client() as client:
        chosen = modelcar.read_served_image(
            client, REPO, Manifest.from_bytes(body, OCI_INDEX), "linux/amd64"
        )
    assert chosen.manifest.digest == amd64.manifest.digest
    assert chosen.config == amd64.config
    assert arm_busybox(tmp_path).platform == "linux/arm64"


def test_no_modelcars_write_nothing(busybox):
    registry = OciRegistry()
    image = store_serving_image(registry)
    before = len(registry.writes())
    with registry.client() as client:
        assert modelcar.NoModelcars().publish(client, REPO, image, "3-modelcar", print) is None
    assert registry.writes()[before:] == []


def companions_request(tag: str = "3") -> object:
    from types import SimpleNamespace

    from mlflow_dock.oci.reference import ImageRef

    return SimpleNamespace(
        target=ImageRef(f"{OciRegistry().host}/{REPO}"),
        tag=tag,
        env={"MLFLOW_DOCK_V2_MODEL_NAME": "fraud model", "MLFLOW_DOCK_V2_MODEL_VERSION": tag},
        log=lambda _line: None,
    )


def test_without_modelcars_the_v2_name_is_the_build_s_and_nothing_is_read(busybox):
    registry = OciRegistry()
    image = store_serving_image(registry)
    companions = modelcar.ImageCompanions(
        registry_factory=registry.client, modelcars=modelcar.NoModelcars()
    )
    request = companions_request()
    before = len(registry.log)
    ours = companions.publish(request, image.manifest, speaks_v2=True)  # type: ignore[arg-type]
    stock = companions.publish(request, image.manifest, speaks_v2=False)  # type: ignore[arg-type]
    assert (ours.v2_model, ours.modelcar) == ("fraud model", None)
    assert (stock.v2_model, stock.modelcar) == (None, None)
    assert len(registry.log) == before  # no registry round trip on the default path
    # An image no builder of this run made (adopted): what it runs is read from it.
    adopted = companions.publish(request, image.manifest.digest, speaks_v2=None)  # type: ignore[arg-type]
    assert adopted.v2_model == "fraud model" and len(registry.log) > before


def test_with_modelcars_the_image_is_read_and_its_modelcar_written(busybox):
    registry = OciRegistry()
    image = store_serving_image(registry)
    companions = modelcar.ImageCompanions(
        registry_factory=registry.client, modelcars=modelcar.BusyboxModelcars(busybox)
    )
    found = companions.publish(companions_request(), image.manifest, speaks_v2=True)  # type: ignore[arg-type]
    digest = registry.tags[(REPO, "3-modelcar")]
    assert found.modelcar == f"{registry.host}/{REPO}@{digest}"
    assert found.v2_model == "fraud model"
