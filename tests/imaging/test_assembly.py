"""Unit tests for mlflow_dock.oci.mutate, mlflow_dock.imaging.assembly and the blob half of
mlflow_dock.oci.remote.

The pure parts (layer tar, config and manifest rewrite) are tested on synthetic images shaped
like what the classic builder, BuildKit and OCI tools push; the I/O parts against an in-memory
registry on httpx.MockTransport. The real Distribution + Docker Engine round trip is in
tests/integration/test_assembly_live.py.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.imaging import modellayers
from mlflow_dock.imaging.assembly import assemble, prepare, publish
from mlflow_dock.imaging.dockerfile import MODEL_DIR
from mlflow_dock.oci import mutate
from mlflow_dock.oci.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Manifest,
)
from mlflow_dock.oci.mutate import (
    CREATED_BY_SUFFIX,
    Layer,
    LayerDigests,
    ModelLayer,
    NotAssemblable,
    Rewritten,
)
from mlflow_dock.oci.remote import RegistryClient, RegistryPermanentError
from support.registry import OciRegistry

# Our images keep the model at MODEL_DIR; mutate itself is generic and takes the target.
model_layer = functools.partial(mutate.model_layer, target=MODEL_DIR)
write_model_layer = functools.partial(mutate.write_model_layer, target=MODEL_DIR)


def replace_last_layer(
    manifest: Any,
    config: bytes,
    layer: Layer | LayerDigests,
    *,
    labels: dict[str, str],
    created: str,
    remove_labels: tuple[str, ...] | list[str] = (),
    require_labels: dict[str, str] | None = None,
    media_type: str | None = None,
    env: dict[str, str] | None = None,
) -> Rewritten:
    """A version whose whole model is one layer, assembled on ``manifest``'s image."""
    earlier = mutate.earlier_image(
        manifest,
        config,
        target=MODEL_DIR,
        require_labels=require_labels,
        media_type=media_type,
        env_keys=env or {},
    )
    return mutate.replace_model_layers(
        earlier,
        [ModelLayer(layer.digest, layer.diff_id, layer.size)],
        labels=labels,
        created=created,
        remove_labels=remove_labels,
        env=env,
    )


USER = "robot"
PASSWORD = "hunter2-Sup3r-s3cret"
REPO = "team/iris-classifier-1a2b3c4d5e"
CREATED = "2025-06-01T12:00:00Z"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic() -> str:
    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


# --------------------------------------------------------------------------- model dirs


def make_model(root: Path, version: str = "1") -> Path:
    (root / "data" / "nested").mkdir(parents=True)
    (root / "MLmodel").write_text(f"flavors: {{}}\nversion: {version}\n")
    (root / "requirements.txt").write_text("scikit-learn==1.5.0\n")
    (root / "data" / "model.pkl").write_bytes(b"\x80\x04" + version.encode() * 100)
    (root / "data" / "nested" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "data" / "nested" / "run.sh").chmod(0o750)
    (root / "data" / "private.json").write_text("{}")
    (root / "data" / "private.json").chmod(0o600)
    return root


def members(layer: Layer) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer.data), mode="r:gz") as tar:
        return tar.getmembers()


def raw_names(layer: Layer) -> list[str]:
    """Names as written in the headers (tarfile strips a directory's trailing slash on read)."""
    data = gzip.decompress(layer.data)
    names = []
    offset = 0
    while offset + 512 <= len(data) and data[offset : offset + 512].strip(b"\0"):
        header = data[offset : offset + 512]
        name = header[:100].rstrip(b"\0").decode()
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        if header[156:157] not in (b"x", b"g"):
            names.append(name)
        offset += 512 + (size + 511) // 512 * 512
    return names


# --------------------------------------------------------------------------- layer


def test_layer_digests_describe_its_bytes(tmp_path: Path) -> None:
    layer = model_layer(make_model(tmp_path / "m"))
    assert layer.digest == sha(layer.data)
    assert layer.size == len(layer.data)
    assert layer.diff_id == sha(gzip.decompress(layer.data))


def test_same_tree_gives_the_same_bytes_whatever_its_path_times_and_modes(tmp_path: Path) -> None:
    first = model_layer(make_model(tmp_path / "a"))
    assert model_layer(tmp_path / "a") == first
    assert model_layer(tmp_path / "a").data == first.data

    # A copy elsewhere, with other times and group/other bits: the layer does not change.
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(tmp_path / "a", copy)
    for path in [copy, *copy.rglob("*")]:
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (copy / "MLmodel").chmod(0o664)
    (copy / "data" / "nested" / "run.sh").chmod(0o700)
    assert model_layer(copy).data == first.data


@pytest.mark.parametrize(
    "change",
    [
        lambda m: (m / "MLmodel").write_text("flavors: {}\nversion: 2\n"),
        lambda m: (m / "data" / "model.pkl").rename(m / "data" / "model2.pkl"),
        lambda m: (m / "data" / "empty-dir").mkdir(),
        lambda m: (m / "MLmodel").chmod(0o755),
    ],
    ids=["content", "name", "new empty directory", "executable bit"],
)
def test_any_change_of_the_tree_changes_both_digests(
    tmp_path: Path, change: Callable[[Path], object]
) -> None:
    before = model_layer(make_model(tmp_path / "m"))
    change(tmp_path / "m")
    after = model_layer(tmp_path / "m")
    assert after.digest != before.digest
    assert after.diff_id != before.diff_id


def test_gzip_header_has_no_time_and_no_file_name(tmp_path: Path) -> None:
    data = model_layer(make_model(tmp_path / "m")).data
    assert data[:3] == b"\x1f\x8b\x08"
    assert data[3] == 0, "no FNAME/FCOMMENT/FEXTRA flags"
    assert data[4:8] == b"\0\0\0\0", "MTIME zero"


def test_tar_entries_paths_modes_and_owners(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    (model / "link-to-mlmodel").symlink_to("MLmodel")
    layer = model_layer(model)

    assert raw_names(layer) == [
        "opt/",
        "opt/ml/",
        "opt/ml/model/",
        "opt/ml/model/MLmodel",
        "opt/ml/model/data/",
        "opt/ml/model/data/model.pkl",
        "opt/ml/model/data/nested/",
        "opt/ml/model/data/nested/run.sh",
        "opt/ml/model/data/private.json",
        "opt/ml/model/link-to-mlmodel",
        "opt/ml/model/requirements.txt",
    ]
    by_name = {m.name: m for m in members(layer)}
    for member in by_name.values():
        assert (member.uid, member.gid, member.uname, member.gname, member.mtime) == (
            0,
            0,
            "",
            "",
            0,
        )
        assert not member.name.startswith("/")
    assert all(by_name[d].isdir() and by_name[d].mode == 0o755 for d in ("opt", "opt/ml"))
    assert by_name["opt/ml/model/data"].mode == 0o755
    assert by_name["opt/ml/model/MLmodel"].mode == 0o644
    assert by_name["opt/ml/model/data/nested/run.sh"].mode == 0o755
    # Owner-only in the source, readable by the image's non-root user in the layer.
    assert by_name["opt/ml/model/data/private.json"].mode == 0o644
    link = by_name["opt/ml/model/link-to-mlmodel"]
    assert link.issym() and link.linkname == "MLmodel"

    with tarfile.open(fileobj=io.BytesIO(layer.data), mode="r:gz") as tar:
        extracted = tar.extractfile("opt/ml/model/data/model.pkl")
        assert extracted is not None
        assert extracted.read() == (model / "data" / "model.pkl").read_bytes()


def test_target_owner_and_time_are_parameters(tmp_path: Path) -> None:
    layer = model_layer(make_model(tmp_path / "m"), target="/srv/model/", uid=10001, gid=10001)
    assert raw_names(layer)[:3] == ["srv/", "srv/model/", "srv/model/MLmodel"]
    assert {(m.uid, m.gid) for m in members(layer)} == {(10001, 10001)}
    dated = model_layer(tmp_path / "m", mtime=1_700_000_000)
    assert {m.mtime for m in members(dated)} == {1_700_000_000}


def test_long_and_non_ascii_names_survive(tmp_path: Path) -> None:
    model = tmp_path / "m"
    deep = model / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / "modèle-权重.bin").write_bytes(b"w")
    layer = model_layer(model)
    names = [m.name for m in members(layer)]
    assert f"opt/ml/model/{'d' * 90}/{'e' * 90}/modèle-权重.bin" in names
    assert model_layer(model).data == layer.data


def test_streaming_writer_matches_the_in_memory_layer(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    out = tmp_path / "layer.tar.gz"
    with out.open("wb") as file:
        digests = write_model_layer(model, file)
    layer = model_layer(model)
    assert (digests.digest, digests.diff_id, digests.size) == (
        layer.digest,
        layer.diff_id,
        layer.size,
    )
    assert out.read_bytes() == layer.data


def test_layer_refuses_missing_dirs_special_files_and_bad_targets(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="does not exist"):
        model_layer(tmp_path / "nope")
    model = make_model(tmp_path / "m")
    for target in ("opt/ml/model", "/", "/opt/../etc"):
        with pytest.raises(ValueError, match="absolute directory"):
            model_layer(model, target=target)
    os.mkfifo(model / "pipe")
    with pytest.raises(PermanentError, match="neither a file"):
        model_layer(model)


# --------------------------------------------------------------------------- synthetic images


BASE_LABELS = {"org.opencontainers.image.ref.name": "debian", "io.mlflow-dock.runtime-key": "k1"}
V1_LABELS = {
    "org.opencontainers.image.version": "1",
    "org.opencontainers.image.created": "2025-01-01T00:00:00Z",
    "io.mlflow-dock.model.version": "1",
    "org.opencontainers.image.source": "https://example.com/repo",
}
V2_LABELS = {
    "org.opencontainers.image.version": "2",
    "org.opencontainers.image.created": CREATED,
    "io.mlflow-dock.model.version": "2",
}

CLASSIC_COPY = "/bin/sh -c #(nop) COPY dir:5f1e2d3c4b5a69788796a5b4c3d2e1f0 in /opt/ml/model/ "
BUILDKIT_COPY = "COPY model/ /opt/ml/model/ # buildkit"


def history_for(model_copy: str, trailing_label: bool = True) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [
        {"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in / "},
        {
            "created": "2024-01-01T00:00:01Z",
            "created_by": '/bin/sh -c #(nop)  CMD ["bash"]',
            "empty_layer": True,
        },
        {"created": "2024-02-01T00:00:00Z", "created_by": "/bin/sh -c pip install -r req.txt"},
        {
            "created": "2024-02-01T00:00:01Z",
            "created_by": "/bin/sh -c #(nop)  LABEL io.mlflow-dock.runtime-key=k1",
            "empty_layer": True,
        },
        {"created": "2025-01-01T00:00:00Z", "created_by": model_copy},
    ]
    if trailing_label:
        entries.append(
            {
                "created": "2025-01-01T00:00:00Z",
                "created_by": "/bin/sh -c #(nop)  LABEL io.mlflow-dock.model.version=1 ...",
                "empty_layer": True,
            }
        )
    return entries


def image_config(history: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2025-01-01T00:00:00Z",
        "docker_version": "20.10.24",
        "container": "0123abcd",
        "container_config": {"Labels": {**BASE_LABELS, **V1_LABELS}, "Cmd": ["LABEL ..."]},
        "config": {
            "User": "10001:10001",
            "Env": ["PATH=/opt/venv/bin:/usr/bin"],
            "Cmd": ["sh", "-c", "exec uvicorn"],
            "Labels": {**BASE_LABELS, **V1_LABELS},
        },
        "rootfs": {"type": "layers", "diff_ids": [sha(b"base"), sha(b"venv"), sha(b"model-1")]},
        "history": history if history is not None else history_for(CLASSIC_COPY),
    }
    config.update(extra)
    return config


def encode(document: dict[str, Any]) -> bytes:
    # Pretty-printed like Distribution serves them: the rewrite must not depend on spacing.
    return json.dumps(document, indent=3).encode()


def manifest_for(
    config: bytes, media_type: str = DOCKER_MANIFEST, *, declare: bool = True
) -> dict[str, Any]:
    oci = media_type == OCI_MANIFEST
    layer_type = OCI_LAYER if oci else DOCKER_LAYER
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "size": len(config),
            "digest": sha(config),
        },
        "layers": [
            {"mediaType": layer_type, "size": 10, "digest": sha(b"gz-" + name)}
            for name in (b"base", b"venv", b"model-1")
        ],
    }
    if oci:
        document["layers"][-1]["annotations"] = {"containerd.io/uncompressed": sha(b"model-1")}
        document["annotations"] = {"org.opencontainers.image.created": "2025-01-01T00:00:00Z"}
    if not declare:
        del document["mediaType"]
    return document


NEW_LAYER = Layer(data=b"new", digest=sha(b"gz-model-2"), diff_id=sha(b"model-2"), size=1234)


def rewrite(config: dict[str, Any], media_type: str = DOCKER_MANIFEST, **kwargs: Any):
    config_bytes = encode(config)
    kwargs.setdefault("labels", V2_LABELS)
    kwargs.setdefault("created", CREATED)
    return replace_last_layer(
        encode(manifest_for(config_bytes, media_type)), config_bytes, NEW_LAYER, **kwargs
    )


# --------------------------------------------------------------------------- config rewrite


def test_config_gets_the_new_diff_id_history_labels_and_time() -> None:
    result = rewrite(image_config(), remove_labels=["org.opencontainers.image.source"])
    config = json.loads(result.config)

    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": [sha(b"base"), sha(b"venv"), NEW_LAYER.diff_id],
    }
    assert config["created"] == CREATED
    # Base and runtime labels are inherited, as the engine does; version labels replaced.
    assert config["config"]["Labels"] == {**BASE_LABELS, **V2_LABELS}
    # The classic builder's trailing LABEL (old labels) is gone; the model entry is new.
    old = history_for(CLASSIC_COPY)
    assert config["history"][:-1] == old[:4]
    assert config["history"][-1]["created"] == CREATED
    assert config["history"][-1]["created_by"] == f"COPY model/ /opt/ml/model/ {CREATED_BY_SUFFIX}"
    assert "empty_layer" not in config["history"][-1]
    # Everything else is the previous image's, except the old build container's record.
    assert config["config"]["User"] == "10001:10001"
    assert config["config"]["Env"] == ["PATH=/opt/venv/bin:/usr/bin"]
    assert (config["os"], config["architecture"], config["docker_version"]) == (
        "linux",
        "amd64",
        "20.10.24",
    )
    assert "container" not in config and "container_config" not in config


def test_labels_are_overlaid_unless_removed() -> None:
    config = json.loads(rewrite(image_config()).config)
    assert (
        config["config"]["Labels"]["org.opencontainers.image.source"]
        == V1_LABELS["org.opencontainers.image.source"]
    )
    assert config["config"]["Labels"]["org.opencontainers.image.version"] == "2"


def test_config_without_labels_or_config_section_gets_them() -> None:
    source = image_config()
    del source["config"]
    config = json.loads(rewrite(source).config)
    assert config["config"] == {"Labels": V2_LABELS}


@pytest.mark.parametrize(
    "model_copy",
    [
        CLASSIC_COPY,
        BUILDKIT_COPY,
        "COPY model /opt/ml/model",
        "COPY --chown=0:0 model/ /opt/ml/model/",
        f"COPY model/ /opt/ml/model/ {CREATED_BY_SUFFIX}",  # an assembled image, next version
    ],
)
def test_model_copy_is_recognised_in_every_builders_wording(model_copy: str) -> None:
    config = json.loads(rewrite(image_config(history_for(model_copy, trailing_label=False))).config)
    assert config["rootfs"]["diff_ids"][-1] == NEW_LAYER.diff_id
    assert len(config["history"]) == 5


V2_ENV = {"MLFLOW_DOCK_V2_MODEL_NAME": "iris", "MLFLOW_DOCK_V2_MODEL_VERSION": "2"}
CLASSIC_ENV = (
    '/bin/sh -c #(nop)  ENV MLFLOW_DOCK_V2_MODEL_NAME="iris" MLFLOW_DOCK_V2_MODEL_VERSION="1"'
)


@pytest.mark.parametrize(
    "env_entry",
    [CLASSIC_ENV, 'ENV MLFLOW_DOCK_V2_MODEL_NAME="iris" MLFLOW_DOCK_V2_MODEL_VERSION="1"'],
)
def test_the_version_s_v2_name_and_version_replace_the_previous_version_s(env_entry: str) -> None:
    history = history_for(CLASSIC_COPY, trailing_label=False)
    history += [
        {"created_by": env_entry, "empty_layer": True},
        {
            "created_by": "/bin/sh -c #(nop)  LABEL io.mlflow-dock.model.version=1",
            "empty_layer": True,
        },
    ]
    source = image_config(history)
    source["config"]["Env"] += [
        "MLFLOW_DOCK_V2_MODEL_NAME=iris",
        "MLFLOW_DOCK_V2_MODEL_VERSION=1",
        "PYTHONPATH=/opt/mlflow-dock/serving",
    ]
    config = json.loads(rewrite(source, env=V2_ENV).config)
    assert config["config"]["Env"] == [
        "PATH=/opt/venv/bin:/usr/bin",
        "PYTHONPATH=/opt/mlflow-dock/serving",
        "MLFLOW_DOCK_V2_MODEL_NAME=iris",
        "MLFLOW_DOCK_V2_MODEL_VERSION=2",
    ]
    # The history says so, after the model layer, as the engine's ENV would; and the next
    # version is assembled on this one the same way.
    *_, model, env = config["history"]
    assert model["created_by"].startswith("COPY model/ /opt/ml/model/")
    assert env["empty_layer"] and env["created_by"].startswith(
        'ENV MLFLOW_DOCK_V2_MODEL_NAME="iris" MLFLOW_DOCK_V2_MODEL_VERSION="2"'
    )
    again = json.loads(rewrite(config, env={**V2_ENV, "MLFLOW_DOCK_V2_MODEL_VERSION": "3"}).config)
    assert again["config"]["Env"][-1] == "MLFLOW_DOCK_V2_MODEL_VERSION=3"
    assert len(again["history"]) == len(config["history"])


def test_only_the_environment_being_replaced_may_follow_the_model() -> None:
    history = history_for(CLASSIC_COPY, trailing_label=False)
    history.append({"created_by": CLASSIC_ENV, "empty_layer": True})
    with pytest.raises(NotAssemblable, match="instructions after its model layer"):
        rewrite(image_config(history))  # no env given: an ENV there is another Dockerfile
    with pytest.raises(NotAssemblable, match="instructions after its model layer"):
        rewrite(image_config(history), env={"OTHER": "x"})


def test_model_layers_are_the_trailing_copies_into_the_model_directory() -> None:
    layers = [{"digest": sha(bytes([i]))} for i in range(4)]
    history = [
        {"created_by": "ADD file:abc in /"},
        {"created_by": "uv pip install numpy"},
        {"created_by": "COPY model/ /opt/ml/model/ # mlflow-dock native"},
        {"created_by": "COPY model/w.bin /opt/ml/model/w.bin # weights"},
        {"created_by": "ENV MLFLOW_DOCK_V2_MODEL_NAME=x", "empty_layer": True},
    ]
    assert mutate.model_layers({"history": history}, layers, MODEL_DIR) == [2, 3]
    assert mutate.model_layers({"history": history[:3]}, layers[:3], MODEL_DIR) == [2]
    stock = [*history[:3], {"created_by": "RUN python -c install"}]
    assert mutate.model_layers({"history": stock}, layers, MODEL_DIR) == []
    assert mutate.model_layers({"history": history}, layers[:2], MODEL_DIR) == []  # mismatch
    assert mutate.model_layers(b"{}", layers, MODEL_DIR) == []


# --------------------------------------------------------------------------- manifest rewrite


@pytest.mark.parametrize(
    ("media_type", "layer_type", "config_type"),
    [(DOCKER_MANIFEST, DOCKER_LAYER, DOCKER_CONFIG), (OCI_MANIFEST, OCI_LAYER, OCI_CONFIG)],
)
def test_manifest_gets_the_new_layer_and_config(
    media_type: str, layer_type: str, config_type: str
) -> None:
    config_bytes = encode(image_config())
    previous = manifest_for(config_bytes, media_type)
    result = replace_last_layer(
        Manifest.from_bytes(encode(previous), media_type),
        config_bytes,
        NEW_LAYER,
        labels=V2_LABELS,
        created=CREATED,
    )
    assert result.media_type == media_type
    manifest = json.loads(result.manifest)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == media_type
    assert manifest["layers"][:-1] == previous["layers"][:-1]
    # A fresh descriptor: the old one's annotations described the old blob.
    assert manifest["layers"][-1] == {
        "mediaType": layer_type,
        "size": NEW_LAYER.size,
        "digest": NEW_LAYER.digest,
    }
    assert manifest["config"] == {
        "mediaType": config_type,
        "size": len(result.config),
        "digest": sha(result.config),
    }
    if media_type == OCI_MANIFEST:
        assert manifest["annotations"] == {"org.opencontainers.image.created": CREATED}


def test_oci_manifest_without_media_type_field() -> None:
    config_bytes = encode(image_config())
    undeclared = encode(manifest_for(config_bytes, OCI_MANIFEST, declare=False))
    result = replace_last_layer(
        undeclared, config_bytes, NEW_LAYER, labels=V2_LABELS, created=CREATED
    )
    assert result.media_type == OCI_MANIFEST
    assert "mediaType" not in json.loads(result.manifest)
    assert json.loads(result.manifest)["layers"][-1]["mediaType"] == OCI_LAYER


def test_rewrite_is_deterministic_and_leaves_its_inputs_alone() -> None:
    config_bytes = encode(image_config())
    previous = manifest_for(config_bytes)
    snapshot = json.loads(json.dumps(previous))
    results = {
        replace_last_layer(previous, config_bytes, NEW_LAYER, labels=V2_LABELS, created=CREATED)
        for _ in range(3)
    }
    assert len(results) == 1
    assert previous == snapshot


def test_layer_digests_are_enough(tmp_path: Path) -> None:
    layer = model_layer(make_model(tmp_path / "m"))
    with (tmp_path / "layer").open("wb") as file:
        digests = write_model_layer(tmp_path / "m", file)
    config_bytes = encode(image_config())
    manifest = manifest_for(config_bytes)
    kwargs: dict[str, Any] = {"labels": V2_LABELS, "created": CREATED}
    assert replace_last_layer(manifest, config_bytes, layer, **kwargs) == replace_last_layer(
        manifest, config_bytes, digests, **kwargs
    )


# --------------------------------------------------------------------------- several model layers

FILE_MARK = mutate.MODEL_FILE_MARK
WEIGHTS = ModelLayer(sha(b"w2"), sha(b"w2"), 5000, compressed=False, file="weights.bin")
TOKENIZER = ModelLayer(sha(b"gz-t2"), sha(b"t2"), 300, compressed=True, file="tok/vocab.json")
REST = ModelLayer(sha(b"gz-rest-2"), sha(b"rest-2"), 40)


def split_image(media_type: str = OCI_MANIFEST) -> tuple[dict[str, Any], bytes]:
    """A version mlflow-dock wrote: base, venv, two model file layers, the rest of the model."""
    history = [
        *history_for(CLASSIC_COPY)[:4],
        {"created_by": f"COPY model/weights.bin /opt/ml/model/weights.bin {FILE_MARK}"},
        {"created_by": f"COPY model/x.bin /opt/ml/model/x.bin {FILE_MARK}"},
        {"created_by": f"COPY model/ /opt/ml/model/ {CREATED_BY_SUFFIX}"},
    ]
    names = [b"base", b"venv", b"w1", b"x1", b"rest-1"]
    config = image_config(history, rootfs={"type": "layers", "diff_ids": [sha(n) for n in names]})
    config_bytes = encode(config)
    manifest = manifest_for(config_bytes, media_type)
    manifest["layers"] = [
        {"mediaType": OCI_LAYER, "size": 10, "digest": sha(b"gz-" + name)} for name in names
    ]
    return manifest, config_bytes


def test_every_model_layer_is_found_by_its_history_and_replaced() -> None:
    manifest, config_bytes = split_image()
    earlier = mutate.earlier_image(manifest, config_bytes, target=MODEL_DIR)
    assert (earlier.model_layers, earlier.layers_below) == (3, 2)
    assert earlier.model_files == {"weights.bin": sha(b"gz-w1"), "x.bin": sha(b"gz-x1")}
    result = mutate.replace_model_layers(
        earlier, [TOKENIZER, WEIGHTS, REST], labels=V2_LABELS, created=CREATED
    )
    document, config = json.loads(result.manifest), json.loads(result.config)
    assert document["layers"][:2] == manifest["layers"][:2]
    assert document["layers"][2:] == [
        {"mediaType": OCI_LAYER, "digest": TOKENIZER.digest, "size": 300},
        {"mediaType": OCI_LAYER_TAR, "digest": WEIGHTS.digest, "size": 5000},
        {"mediaType": OCI_LAYER, "digest": REST.digest, "size": 40},
    ]
    assert config["rootfs"]["diff_ids"] == [
        sha(b"base"),
        sha(b"venv"),
        sha(b"t2"),
        sha(b"w2"),
        sha(b"rest-2"),
    ]
    assert [h["created_by"] for h in config["history"][4:]] == [
        f"COPY model/tok/vocab.json /opt/ml/model/tok/vocab.json {FILE_MARK}",
        f"COPY model/weights.bin /opt/ml/model/weights.bin {FILE_MARK}",
        f"COPY model/ /opt/ml/model/ {CREATED_BY_SUFFIX}",
    ]
    # ... and the next version finds all three again, whatever their number was before.
    again = mutate.earlier_image(
        Manifest.from_bytes(result.manifest, result.media_type), result.config, target=MODEL_DIR
    )
    assert again.model_layers == 3
    assert again.model_files == {"tok/vocab.json": TOKENIZER.digest, "weights.bin": WEIGHTS.digest}
    one = mutate.replace_model_layers(again, [REST], labels={}, created=CREATED)
    assert len(json.loads(one.manifest)["layers"]) == 3


def test_an_engine_image_with_one_model_layer_takes_file_layers_as_an_oci_image() -> None:
    config_bytes = encode(image_config())
    manifest = manifest_for(config_bytes, DOCKER_MANIFEST)
    earlier = mutate.earlier_image(manifest, config_bytes, target=MODEL_DIR)
    assert earlier.model_layers == 1
    result = mutate.replace_model_layers(earlier, [WEIGHTS, REST], labels={}, created=CREATED)
    # Docker's schema 2 has no plain layer type: the same blobs, described the OCI way.
    document = json.loads(result.manifest)
    assert result.media_type == document["mediaType"] == OCI_MANIFEST
    assert document["config"]["mediaType"] == OCI_CONFIG
    assert [d["mediaType"] for d in document["layers"]] == [
        OCI_LAYER,
        OCI_LAYER,
        OCI_LAYER_TAR,
        OCI_LAYER,
    ]
    assert [d["digest"] for d in document["layers"][:2]] == [sha(b"gz-base"), sha(b"gz-venv")]
    # Compressed layers only: the engine's Docker manifest stays one.
    same_kind = mutate.replace_model_layers(earlier, [REST], labels={}, created=CREATED)
    assert same_kind.media_type == DOCKER_MANIFEST


def test_a_file_layer_entry_not_right_below_the_model_copy_is_not_the_models() -> None:
    history = [
        history_for(CLASSIC_COPY)[0],
        {"created_by": f"COPY model/w.bin /opt/ml/model/w.bin {FILE_MARK}"},
        history_for(CLASSIC_COPY)[2],  # pip install
        {"created_by": BUILDKIT_COPY},
    ]
    names = [b"base", b"w", b"venv", b"model-1"]
    config_bytes = encode(
        image_config(history, rootfs={"type": "layers", "diff_ids": [sha(n) for n in names]})
    )
    manifest = manifest_for(config_bytes)
    manifest["layers"] = [
        {"mediaType": DOCKER_LAYER, "size": 1, "digest": sha(b"gz-" + n)} for n in names
    ]
    earlier = mutate.earlier_image(manifest, config_bytes, target=MODEL_DIR)
    assert (earlier.model_layers, earlier.layers_below) == (1, 3)
    # An empty entry (a LABEL) between model layers does not separate them.
    history[2] = {"created_by": "/bin/sh -c #(nop)  LABEL a=b", "empty_layer": True}
    names.remove(b"venv")
    config_bytes = encode(
        image_config(history, rootfs={"type": "layers", "diff_ids": [sha(n) for n in names]})
    )
    manifest = manifest_for(config_bytes)
    manifest["layers"] = manifest["layers"][:3]
    earlier = mutate.earlier_image(manifest, config_bytes, target=MODEL_DIR)
    assert (earlier.model_layers, earlier.layers_below) == (2, 1)


def test_the_rest_of_the_model_must_come_last() -> None:
    config_bytes = encode(image_config())
    earlier = mutate.earlier_image(manifest_for(config_bytes), config_bytes, target=MODEL_DIR)
    for layers in ([REST, WEIGHTS], []):
        with pytest.raises(ValueError, match="last"):
            mutate.replace_model_layers(earlier, layers, labels={}, created=CREATED)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "history",
    [
        [*history_for(CLASSIC_COPY)[:4], {"created_by": "/bin/sh -c pip install mlflow"}],
        [*history_for(CLASSIC_COPY)[:4], {"created_by": "COPY model/ /srv/model/"}],
        [*history_for(CLASSIC_COPY)[:4], {"created_by": "COPY other/ /opt/ml/model-old/"}],
        [*history_for(CLASSIC_COPY)[:4], {}],
    ],
    ids=["RUN", "other target", "other source and target", "no created_by"],
)
def test_last_layer_must_be_the_model_copy(history: list[dict[str, Any]]) -> None:
    with pytest.raises(PermanentError, match="previous image's last layer is not a model layer"):
        rewrite(image_config(history))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (image_config([]), "no history"),
        (image_config(history_for(CLASSIC_COPY)[2:]), "history describes 2 layers"),
        (
            image_config(
                [
                    *history_for(CLASSIC_COPY),
                    {"created_by": "/bin/sh -c #(nop)  ENV X=1", "empty_layer": True},
                ]
            ),
            "instructions after its model layer",
        ),
        (image_config(rootfs={"type": "layers", "diff_ids": []}), "diff_ids"),
        (image_config(rootfs=None), "diff_ids"),
    ],
    ids=["no history", "history too short", "instruction after COPY", "diff_ids", "no rootfs"],
)
def test_inconsistent_previous_images_are_refused(config: dict[str, Any], match: str) -> None:
    with pytest.raises(NotAssemblable, match=match):
        rewrite(config)


@pytest.mark.parametrize("index_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
def test_indexes_are_refused(index_type: str) -> None:
    index = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "size": 1, "digest": sha(b"x")}],
    }
    for given in (encode(index), Manifest.from_bytes(encode(index), index_type)):
        with pytest.raises(NotAssemblable, match="image index"):
            replace_last_layer(given, b"{}", NEW_LAYER, labels={}, created=CREATED)
    # An OCI index need not declare its mediaType; its "manifests" still gives it away.
    del index["mediaType"]
    with pytest.raises(NotAssemblable, match="image index"):
        replace_last_layer(index, b"{}", NEW_LAYER, labels={}, created=CREATED)


def test_other_manifest_shapes_are_refused() -> None:
    config_bytes = encode(image_config())
    good = manifest_for(config_bytes)
    schema1 = {"schemaVersion": 1, "name": "x", "fsLayers": []}
    artifact = {**good, "config": {**good["config"], "mediaType": "application/vnd.cncf.helm"}}
    no_layers = {**good, "layers": []}
    kwargs: dict[str, Any] = {"labels": V2_LABELS, "created": CREATED}
    for document, match in [
        (schema1, "unsupported manifest type"),
        (artifact, "not a container image config"),
        (no_layers, "no layers"),
    ]:
        with pytest.raises(NotAssemblable, match=match):
            replace_last_layer(document, config_bytes, NEW_LAYER, **kwargs)
    with pytest.raises(NotAssemblable, match="not JSON"):
        replace_last_layer(b"<html>", config_bytes, NEW_LAYER, **kwargs)
    with pytest.raises(NotAssemblable, match="not the one its manifest names"):
        replace_last_layer(good, config_bytes + b" ", NEW_LAYER, **kwargs)


def test_required_labels_guard_the_runtime() -> None:
    rewrite(image_config(), require_labels={"io.mlflow-dock.runtime-key": "k1"})
    with pytest.raises(NotAssemblable, match="runtime-key='k1', this version needs 'k2'"):
        rewrite(image_config(), require_labels={"io.mlflow-dock.runtime-key": "k2"})
    with pytest.raises(NotAssemblable, match="None"):
        rewrite(image_config(), require_labels={"io.mlflow-dock.dockerfile": "d"})


# --------------------------------------------------------------------------- registry

Handler = Callable[[httpx.Request], httpx.Response]


def blob_registry(
    auth: Literal["none", "basic", "bearer"] = "basic",
    *,
    location: Literal["absolute", "relative", "elsewhere"] = "absolute",
    can_mount: bool = True,
    fail: dict[tuple[str, str], int] | None = None,
    challenge_next_upload_put: bool = False,
) -> OciRegistry:
    """The shared registry, serving blobs from object storage (a 307 to storage.example.com)
    as Distribution with a redirecting storage driver does.

    Bearer challenges each request with the scope it needs (pull for reads, pull,push for
    uploads, plus pull on the source of a mount), like Distribution's token auth does.
    """
    fake = OciRegistry(
        auth=auth,
        username=USER,
        password=PASSWORD,
        upload_location=location,
        mount=can_mount,
        redirect_blobs=True,
    )
    fake.faults.update(fail or {})
    if challenge_next_upload_put:
        # The token is revoked between POST and PUT: the body must be sent again in full.
        fake.fail_next("PUT", "upload", 401)
    return fake


def push_image(fake: OciRegistry, repo: str, tag: str, media_type: str = DOCKER_MANIFEST) -> str:
    """Store a version 1 image as the engine would have pushed it; returns its digest."""
    config = encode(image_config())
    manifest = encode(manifest_for(config, media_type))
    fake.put_blob(repo, config)
    for name in (b"base", b"venv", b"model-1"):
        fake.put_blob(repo, b"gz-" + name)
    return fake.put_manifest(repo, manifest, media_type, tag=tag)


def client_for(handler: Handler, **kwargs: Any) -> RegistryClient:
    kwargs.setdefault("username", USER)
    kwargs.setdefault("password", PASSWORD)
    return RegistryClient("registry.example.com", transport=httpx.MockTransport(handler), **kwargs)


# --------------------------------------------------------------------------- registry: blobs


def test_blob_exists_and_get_blob_follow_the_storage_redirect_without_credentials() -> None:
    fake = blob_registry()
    fake.blobs[(REPO, sha(b"config"))] = b"config"
    with client_for(fake) as client:
        assert client.blob_exists(REPO, sha(b"config")) is True
        assert client.blob_exists(REPO, sha(b"other")) is False
        assert client.get_blob(REPO, sha(b"config")) == b"config"
        with pytest.raises(RegistryPermanentError) as info:
            client.get_blob(REPO, sha(b"other"))
    assert str(info.value) == f"blob {REPO}@{sha(b'other')} not found"
    assert info.value.status_code == 404
    storage = [r for r in fake.requests if r.url.host == "storage.example.com"]
    assert storage and all("Authorization" not in r.headers for r in storage)


def test_get_blob_refuses_content_that_does_not_match_its_digest() -> None:
    fake = blob_registry()
    fake.blobs[(REPO, sha(b"config"))] = b"tampered"
    with client_for(fake) as client, pytest.raises(PermanentError, match="content digest"):
        client.get_blob(REPO, sha(b"config"))


def test_blob_errors_go_through_the_one_translation() -> None:
    fake = blob_registry(fail={("HEAD", "blob"): 503, ("POST", "upload"): 403})
    with client_for(fake) as client:
        with pytest.raises(RetryableError, match="HTTP 503 while checking blob"):
            client.blob_exists(REPO, sha(b"x"))
        fake.faults = {("POST", "upload"): 403}
        with pytest.raises(PermanentError, match=f"denied access to {REPO}"):
            client.upload_blob(REPO, b"x")
        with pytest.raises(PermanentError, match="invalid digest"):
            client.blob_exists(REPO, "not-a-digest")
    assert PASSWORD not in repr(client)


@pytest.mark.parametrize("location", ["absolute", "relative"])
def test_upload_is_post_then_one_put_with_the_digest(location: str) -> None:
    fake = blob_registry(location=location)
    with client_for(fake) as client:
        assert client.upload_blob(REPO, b"layer bytes") == sha(b"layer bytes")
    assert fake.blobs[(REPO, sha(b"layer bytes"))] == b"layer bytes"
    assert [m for m, _ in fake.writes()] == ["POST", "PUT"]
    put = fake.requests[-1]
    assert put.url.params["digest"] == sha(b"layer bytes")
    assert put.headers["Content-Type"] == "application/octet-stream"
    assert put.headers["Authorization"] == basic()


def test_upload_skips_blobs_the_repository_has() -> None:
    fake = blob_registry()
    fake.blobs[(REPO, sha(b"layer"))] = b"layer"
    with client_for(fake) as client:
        assert client.upload_blob(REPO, b"layer", sha(b"layer")) == sha(b"layer")
    assert fake.writes() == []


def test_upload_refuses_bytes_that_are_not_the_digest_given() -> None:
    fake = blob_registry()
    with client_for(fake) as client, pytest.raises(PermanentError, match="cannot upload"):
        client.upload_blob(REPO, b"layer", sha(b"other"))
    assert fake.requests == []


def test_upload_streams_files_and_paths(tmp_path: Path) -> None:
    fake = blob_registry()
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))  # several chunks
    with client_for(fake) as client:
        assert client.upload_blob(REPO, path) == sha(path.read_bytes())
        with io.BytesIO(b"skipped header|payload") as file:
            file.seek(len(b"skipped header|"))
            assert client.upload_blob(REPO, file) == sha(b"payload")
            file.seek(len(b"skipped header|"))
            with client_for(blob_registry()) as other:
                assert other.upload_blob("other/repo", file, sha(b"payload")) == sha(b"payload")
    assert fake.blobs[(REPO, sha(path.read_bytes()))] == path.read_bytes()
    assert fake.blobs[(REPO, sha(b"payload"))] == b"payload"


def test_a_challenged_upload_resends_the_whole_file() -> None:
    fake = blob_registry(auth="bearer", challenge_next_upload_put=True)
    payload = os.urandom((1 << 20) + 17)
    with client_for(fake) as client, io.BytesIO(payload) as file:
        assert client.upload_blob(REPO, file) == sha(payload)
    puts = [r for r in fake.requests if r.method == "PUT"]
    assert len(puts) == 2 and puts[0].content == puts[1].content == payload
    assert [r.headers["Authorization"] for r in puts] == ["Bearer tok-1", "Bearer tok-2"]
    assert fake.blobs[(REPO, sha(payload))] == payload


def test_upload_session_on_another_origin_gets_no_credentials() -> None:
    fake = blob_registry(location="elsewhere")
    with client_for(fake) as client:
        client.upload_blob(REPO, b"layer")
    put = fake.requests[-1]
    assert put.url.host == "storage.example.com" and "Authorization" not in put.headers
    assert fake.blobs[(REPO, sha(b"layer"))] == b"layer"


def test_bearer_upload_uses_one_push_token() -> None:
    fake = blob_registry(auth="bearer")
    with client_for(fake) as client:
        client.upload_blob(REPO, b"layer one")
        client.upload_blob(REPO, b"layer two")
    scopes = [r.url.params.get_list("scope") for r in fake.token_requests]
    assert scopes == [[f"repository:{REPO}:pull,push"]]


def test_mount_links_a_blob_from_another_repository() -> None:
    fake = blob_registry(auth="bearer")
    fake.blobs[("team/other", sha(b"venv"))] = b"venv"
    with client_for(fake) as client:
        assert client.mount_blob(REPO, sha(b"venv"), "team/other") is True
    assert fake.blobs[(REPO, sha(b"venv"))] == b"venv"
    post = next(r for r in fake.requests if r.method == "POST")
    assert post.url.params["mount"] == sha(b"venv") and post.url.params["from"] == "team/other"
    (token,) = fake.token_requests
    assert token.url.params.get_list("scope") == [
        f"repository:{REPO}:pull,push",
        "repository:team/other:pull",
    ]


def test_refused_mount_cancels_or_continues_the_upload() -> None:
    fake = blob_registry(can_mount=False)
    fake.blobs[("team/other", sha(b"venv"))] = b"venv"
    with client_for(fake) as client:
        assert client.mount_blob(REPO, sha(b"venv"), "team/other") is False
        assert fake.sessions == {}, "the session the registry opened instead is cancelled"
        assert client.upload_blob(REPO, b"venv", mount_from="team/other") == sha(b"venv")
    assert fake.blobs[(REPO, sha(b"venv"))] == b"venv"
    assert [m for m, _ in fake.writes()] == ["POST", "DELETE", "POST", "PUT"]


def test_put_manifest_by_digest_and_a_digest_that_is_not_the_bodys() -> None:
    fake = blob_registry()
    push_image(fake, REPO, "1")
    body, media_type = fake.manifest(REPO, "1")
    manifest = Manifest.from_bytes(body, media_type)
    with client_for(fake) as client:
        assert client.put_manifest_by_digest(REPO, manifest) == manifest.digest
        with pytest.raises(PermanentError, match="under another digest"):
            client.put_manifest(REPO, sha(b"other"), manifest)
    assert fake.writes() == [("PUT", f"/v2/{REPO}/manifests/{manifest.digest}")]


# --------------------------------------------------------------------------- prepare / assemble


def stored_image(fake: OciRegistry, reference: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body, _ = fake.manifest(REPO, reference)
    manifest = json.loads(body)
    return manifest, json.loads(fake.blobs[(REPO, manifest["config"]["digest"])])


@pytest.mark.parametrize("media_type", [DOCKER_MANIFEST, OCI_MANIFEST])
def test_prepare_stores_an_untagged_image_and_tag_publishes_it(
    tmp_path: Path, media_type: str
) -> None:
    fake = blob_registry(auth="bearer")
    v1 = push_image(fake, REPO, "1", media_type)
    model = make_model(tmp_path / "m", "2")
    with client_for(fake) as client:
        prepared = prepare(
            client,
            REPO,
            previous_reference=v1,
            model_dir=model,
            labels=V2_LABELS,
            created=CREATED,
            require_labels={"io.mlflow-dock.runtime-key": "k1"},
        )
        assert (REPO, "2") not in fake.tags
        assert fake.writes()[-1] == ("PUT", f"/v2/{REPO}/manifests/{prepared.digest}")

        image = publish(client, prepared, "2")
    assert fake.writes()[-1] == ("PUT", f"/v2/{REPO}/manifests/2")
    assert image.tag == "2" and image.digest == prepared.digest == sha(fake.manifest(REPO, "2")[0])
    assert image.media_type == media_type and prepared.previous_digest == v1

    layer = model_layer(model)
    manifest, config = stored_image(fake, "2")
    assert fake.blobs[(REPO, image.layer_digest)] == layer.data
    assert manifest["layers"][-1]["digest"] == layer.digest == image.layer_digest
    assert manifest["config"]["digest"] == image.config_digest
    assert config["rootfs"]["diff_ids"][-1] == layer.diff_id
    assert config["config"]["Labels"] == {**BASE_LABELS, **V1_LABELS, **V2_LABELS}
    assert image.size == sum(d["size"] for d in manifest["layers"]) + manifest["config"]["size"]
    # Two uploads (layer, config), pushed with a push token (the two parallel uploads may
    # each have fetched one).
    assert [m for m, p in fake.writes()].count("POST") == 2
    scopes = [r.url.params.get_list("scope") for r in fake.token_requests]
    assert scopes[0] == [f"repository:{REPO}:pull"]
    assert {tuple(s) for s in scopes[1:]} == {(f"repository:{REPO}:pull,push",)}


def test_publish_never_moves_a_tag_that_names_another_image(tmp_path: Path) -> None:
    """A re-run after a lost lease prepared another digest: the tag keeps the first one."""
    fake = blob_registry()
    v1 = push_image(fake, REPO, "1")
    with client_for(fake) as client:
        prepared = prepare(
            client,
            REPO,
            previous_reference=v1,
            model_dir=make_model(tmp_path / "m", "2"),
            labels=V2_LABELS,
            created=CREATED,
        )
        first_run = push_image(fake, REPO, "2")  # the tag appeared while this run prepared
        assert first_run != prepared.digest
        image = publish(client, prepared, "2")
        again = publish(client, prepared, "1")  # a tag already on this very image: no write
        fake.tags[(REPO, "3")] = prepared.digest
        same = publish(client, prepared, "3")
    assert image.digest == first_run and image.tag == "2"
    assert image.note is not None and first_run in image.note and "never move" in image.note
    assert again.digest == v1 and again.note is not None
    assert same.digest == prepared.digest and same.note is None
    assert not [p for m, p in fake.writes() if m == "PUT" and p.endswith(("/2", "/1", "/3"))]
    assert fake.manifest(REPO, "2")[0] != fake.manifest(REPO, prepared.digest)[0]


def test_assemble_with_a_tag_puts_the_manifest_once(tmp_path: Path) -> None:
    fake = blob_registry()
    push_image(fake, REPO, "1")
    with client_for(fake) as client:
        image = assemble(
            client,
            REPO,
            previous_reference="1",
            model_dir=make_model(tmp_path / "m", "2"),
            labels=V2_LABELS,
            created=CREATED,
            tag="2",
        )
        untagged = assemble(
            client,
            REPO,
            previous_reference="1",
            model_dir=tmp_path / "m",
            labels=V2_LABELS,
            created=CREATED,
        )
    manifest_puts = [p for m, p in fake.writes() if "/manifests/" in p]
    assert manifest_puts == [f"/v2/{REPO}/manifests/2", f"/v2/{REPO}/manifests/{image.digest}"]
    assert untagged.digest == image.digest and untagged.tag is None
    # The second run found both blobs already there.
    assert [m for m, _ in fake.writes()].count("POST") == 2


def test_created_defaults_to_now(tmp_path: Path) -> None:
    fake = blob_registry()
    push_image(fake, REPO, "1")
    with client_for(fake) as client:
        assemble(
            client,
            REPO,
            previous_reference="1",
            model_dir=make_model(tmp_path / "m"),
            labels=V2_LABELS,
            tag="2",
        )
    _, config = stored_image(fake, "2")
    assert config["created"].endswith("Z") and config["created"] > "2025"
    assert config["history"][-1]["created"] == config["created"]


def test_big_models_spill_to_disk_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(tmp_path / "m")
    (model / "data" / "weights.bin").write_bytes(os.urandom(256 << 10))
    results = []
    for spool in (64 << 20, 1024):
        monkeypatch.setattr(modellayers, "_SPOOL_IN_MEMORY", spool)
        fake = blob_registry()
        push_image(fake, REPO, "1")
        with client_for(fake) as client:
            image = assemble(
                client, REPO, previous_reference="1", model_dir=model, labels={}, created=CREATED
            )
        results.append((image.digest, fake.blobs[(REPO, image.layer_digest)]))
    assert results[0] == results[1]
    assert results[0][1] == model_layer(model).data


@pytest.mark.parametrize("reference", ["no-such-tag", sha(b"nothing")])
def test_missing_previous_image_is_not_assemblable_and_writes_nothing(
    tmp_path: Path, reference: str
) -> None:
    fake = blob_registry()
    with client_for(fake) as client, pytest.raises(NotAssemblable, match="not found"):
        prepare(
            client,
            REPO,
            previous_reference=reference,
            model_dir=make_model(tmp_path / "m"),
            labels=V2_LABELS,
        )
    assert fake.writes() == []


def test_previous_image_with_a_missing_config_is_not_assemblable(tmp_path: Path) -> None:
    fake = blob_registry()
    push_image(fake, REPO, "1")
    manifest, _ = stored_image(fake, "1")
    del fake.blobs[(REPO, manifest["config"]["digest"])]
    with client_for(fake) as client, pytest.raises(NotAssemblable, match=r"blob .* not found"):
        prepare(
            client, REPO, previous_reference="1", model_dir=make_model(tmp_path / "m"), labels={}
        )


def test_index_or_foreign_image_is_not_assemblable_and_writes_nothing(tmp_path: Path) -> None:
    fake = blob_registry()
    index = encode({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    fake.put_manifest(REPO, index, OCI_INDEX, tag="1")
    with client_for(fake) as client:
        with pytest.raises(NotAssemblable, match="image index"):
            prepare(
                client,
                REPO,
                previous_reference="1",
                model_dir=make_model(tmp_path / "m"),
                labels={},
            )
        push_image(fake, REPO, "1")
        with pytest.raises(NotAssemblable, match="runtime-key"):
            prepare(
                client,
                REPO,
                previous_reference="1",
                model_dir=tmp_path / "m",
                labels={},
                require_labels={"io.mlflow-dock.runtime-key": "another"},
            )
    assert fake.writes() == []


def test_registry_outages_stay_retryable(tmp_path: Path) -> None:
    fake = blob_registry(fail={("GET", "manifest"): 503})
    push_image(fake, REPO, "1")
    with client_for(fake) as client, pytest.raises(RetryableError):
        prepare(
            client, REPO, previous_reference="1", model_dir=make_model(tmp_path / "m"), labels={}
        )
    fake.faults = {("PUT", "upload"): 502}
    with client_for(fake) as client, pytest.raises(RetryableError, match="HTTP 502"):
        prepare(client, REPO, previous_reference="1", model_dir=tmp_path / "m", labels={})
    assert not any(p.startswith(f"/v2/{REPO}/manifests/") for m, p in fake.writes())


@pytest.mark.parametrize("name", ["w.bin", "a b/c d.bin", "x # mlflow-dock model file.bin"])
def test_a_model_files_path_is_read_back_from_its_history_entry(name: str) -> None:
    layer = ModelLayer(sha(b"x"), sha(b"x"), 1, compressed=False, file=name)
    created_by = layer.created_by(MODEL_DIR, CREATED_BY_SUFFIX)
    assert mutate._model_file_path(created_by, MODEL_DIR) == name
    assert mutate._model_file_path(created_by.replace(MODEL_DIR, "/srv"), MODEL_DIR) is None
    assert (
        mutate._model_file_path(f"COPY model/ {MODEL_DIR}/ {CREATED_BY_SUFFIX}", MODEL_DIR) is None
    )
