"""A model's layers (imaging/modellayers.py and the FileLayer of oci/mutate.py): which files get
a layer of their own, what those layers hold, which codec, the registry's layer limit, and that
a version keeping its weights uploads none of them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.assembly import assemble
from mlflow_dock.imaging.dockerfile import MODEL_DIR
from mlflow_dock.imaging.modellayers import (
    MAX_FILE_LAYERS,
    MAX_IMAGE_LAYERS,
    ModelLayerPolicy,
    push_model_layers,
)
from mlflow_dock.oci.manifest import OCI_LAYER, OCI_LAYER_TAR
from mlflow_dock.oci.mutate import FileLayer, ModelLayer, layered_files
from support.registry import OciRegistry

REPO = "team/llm"
KIB = 1 << 10
POLICY = ModelLayerPolicy(file_layer_bytes=64 * KIB)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_model(root: Path, *, code: str = "v1", weights: bytes | None = None) -> Path:
    (root / "artifacts").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {python_function: {}}\n")
    (root / "code.py").write_text(f"VERSION = {code!r}\n")
    (root / "artifacts" / "weights.bin").write_bytes(weights or os.urandom(200 * KIB))
    (root / "artifacts" / "zeros.pt").write_bytes(bytes(100 * KIB))  # compresses very well
    (root / "small.bin").write_bytes(os.urandom(10 * KIB))
    (root / "artifacts" / "link.bin").symlink_to("weights.bin")
    return root


def members(blob: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        return {m.name: m for m in tar.getmembers()}


def push(
    registry: OciRegistry, model: Path, *, below: int = 5, lines: list[str] | None = None, **kwargs
) -> list[ModelLayer]:
    """The model's layers pushed to REPO; the job log's lines go to ``lines``."""
    with registry.client() as client:
        return push_model_layers(
            client,
            REPO,
            model,
            policy=kwargs.pop("policy", POLICY),
            layers_below=below,
            log=(lines if lines is not None else []).append,
            **kwargs,
        )


def test_files_above_the_threshold_get_layers_of_their_own_the_rest_one(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    registry = OciRegistry()
    layers = push(registry, model)
    assert [layer.file for layer in layers] == ["artifacts/weights.bin", "artifacts/zeros.pt", None]
    weights, zeros, rest = (registry.blobs[(REPO, layer.digest)] for layer in layers)
    # Each file layer: the file at its place, with its parents, nothing else.
    found = members(weights)
    assert list(found) == [
        "opt",
        "opt/ml",
        "opt/ml/model",
        "opt/ml/model/artifacts",
        "opt/ml/model/artifacts/weights.bin",
    ]
    with tarfile.open(fileobj=io.BytesIO(weights)) as tar:
        extracted = tar.extractfile("opt/ml/model/artifacts/weights.bin")
        assert extracted is not None
        assert extracted.read() == (model / "artifacts" / "weights.bin").read_bytes()
    # The rest: everything else, the link to the weights included (kept a symlink).
    rest_names = set(members(gzip.decompress(rest)))
    assert "opt/ml/model/artifacts/weights.bin" not in rest_names
    assert "opt/ml/model/artifacts/zeros.pt" not in rest_names
    assert {
        "opt/ml/model/MLmodel",
        "opt/ml/model/small.bin",
        "opt/ml/model/artifacts/link.bin",
    } <= (rest_names)
    # Codec per file: random weights plain (digest = diff_id), zeros gzip, the rest gzip.
    assert (layers[0].compressed, layers[0].digest == layers[0].diff_id) == (False, True)
    assert layers[0].descriptor()["mediaType"] == OCI_LAYER_TAR
    assert layers[1].compressed and layers[1].descriptor()["mediaType"] == OCI_LAYER
    assert len(zeros) < 10 * KIB and sha(gzip.decompress(zeros)) == layers[1].diff_id
    assert layers[2].compressed and layers[2].file is None


def test_a_file_layer_depends_only_on_content_path_and_mode(tmp_path: Path) -> None:
    data = os.urandom(100 * KIB)
    first = make_model(tmp_path / "a", code="one", weights=data)
    second = make_model(tmp_path / "b", code="two", weights=data)
    os.utime(second / "artifacts" / "weights.bin", (1, 1))
    one, two = (FileLayer(m, "artifacts/weights.bin", target=MODEL_DIR) for m in (first, second))
    assert one.digests() == two.digests()
    (second / "artifacts" / "weights.bin").chmod(0o755)
    assert FileLayer(second, "artifacts/weights.bin", target=MODEL_DIR).digests() != one.digests()
    (first / "artifacts" / "moved.bin").write_bytes(data)
    assert FileLayer(first, "artifacts/moved.bin", target=MODEL_DIR).digests() != one.digests()


def test_a_file_layer_is_what_tarfile_writes_and_reads_at_any_offset(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    name = "artifacts/" + "w" * 120 + ".bin"  # a long name takes a PAX header
    (model / name).write_bytes(os.urandom(70 * KIB + 3))
    layer = FileLayer(model, name, target=MODEL_DIR)
    data = layer.read()
    assert len(data) == layer.size and len(data) % tarfile.RECORDSIZE == 0
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for parent in ("opt", "opt/ml", "opt/ml/model", "opt/ml/model/artifacts"):
            info = tarfile.TarInfo(parent)
            info.type, info.mode, info.uname, info.gname = tarfile.DIRTYPE, 0o755, "", ""
            tar.addfile(info)
        info = tarfile.TarInfo(f"opt/ml/model/{name}")
        info.mode, info.uname, info.gname = 0o644, "", ""
        info.size = (model / name).stat().st_size
        with (model / name).open("rb") as file:
            tar.addfile(info, file)
    assert data == expected.getvalue()
    for offset in (0, 511, 2000, len(data) - 5000, len(data) - 1):
        layer.seek(offset)
        assert layer.read(4096) == data[offset : offset + 4096]


def test_a_version_that_keeps_its_weights_uploads_none_of_them(tmp_path: Path) -> None:
    data = os.urandom(300 * KIB)
    registry = OciRegistry()
    first = push(registry, make_model(tmp_path / "v1", code="one", weights=data))
    uploads = len([e for e in registry.log if e.request.method == "POST"])
    lines: list[str] = []
    second = push(registry, make_model(tmp_path / "v2", code="two", weights=data), lines=lines)
    assert [layer.digest for layer in second[:2]] == [layer.digest for layer in first[:2]]
    assert second[2].digest != first[2].digest
    # Only the rest of the model went up: one upload session.
    assert len([e for e in registry.log if e.request.method == "POST"]) == uploads + 1
    weights_line = next(line for line in lines if "weights.bin" in line)
    assert "already in the registry, not uploaded" in weights_line


def test_the_layer_budget_keeps_the_largest_files(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    for index, size in enumerate([70, 90, 80, 100]):
        (model / f"shard-{index}.bin").write_bytes(os.urandom(size * KIB))
    assert layered_files(model, min_bytes=64 * KIB, limit=2) == ("shard-1.bin", "shard-3.bin")
    assert layered_files(model, min_bytes=64 * KIB, limit=0) == ()
    assert POLICY.file_layers(5) == MAX_FILE_LAYERS
    assert POLICY.file_layers(MAX_IMAGE_LAYERS - 3) == 2
    assert POLICY.file_layers(MAX_IMAGE_LAYERS) == 0
    layers = push(OciRegistry(), model, below=MAX_IMAGE_LAYERS - 3)
    assert [layer.file for layer in layers] == ["shard-1.bin", "shard-3.bin", None]


def test_a_file_bigger_than_the_registrys_layer_limit_fails_before_any_upload(
    tmp_path: Path,
) -> None:
    model = make_model(tmp_path / "m")
    registry = OciRegistry(host="ghcr.io")
    policy = ModelLayerPolicy(file_layer_bytes=64 * KIB, max_layer_bytes=150 * KIB)
    with pytest.raises(PermanentError) as info:
        push(registry, model, policy=policy)
    assert str(info.value) == (
        "model file 'artifacts/weights.bin' is 200.0 KiB, more than the 150.0 KiB a layer may "
        "have on ghcr.io (MLFLOW_DOCK_MAX_LAYER_MIB); split it into smaller files"
    )
    assert registry.log == []


def test_assembly_on_an_earlier_image_writes_the_file_layers(tmp_path: Path) -> None:
    registry = OciRegistry()
    data = os.urandom(200 * KIB)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"io.mlflow-dock.runtime-key": "k"}},
            "rootfs": {"type": "layers", "diff_ids": [sha(b"base"), sha(b"model")]},
            "history": [{"created_by": "ADD base"}, {"created_by": "COPY model/ /opt/ml/model/"}],
        }
    ).encode()
    registry.put_blob(REPO, config)
    for name in (b"base", b"model"):
        registry.put_blob(REPO, b"gz-" + name)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": OCI_LAYER, "digest": sha(b"gz-" + n), "size": 3}
            for n in (b"base", b"model")
        ],
    }
    registry.put_manifest(
        REPO, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json", tag="1"
    )
    images = []
    for version in ("2", "3"):
        with registry.client() as client:
            images.append(
                assemble(
                    client,
                    REPO,
                    previous_reference=images[-1].digest if images else "1",
                    model_dir=make_model(tmp_path / version, code=version, weights=data),
                    labels={},
                    tag=version,
                    policy=POLICY,
                    work=tmp_path,
                )
            )
    layers = [registry.doc(REPO, tag)["layers"] for tag in ("2", "3")]
    assert [len(found) for found in layers] == [4, 4]  # base, weights, zeros, rest
    assert layers[0][:3] == layers[1][:3] and layers[0][3] != layers[1][3]
    assert images[1].layer_digest == layers[1][3]["digest"]
