"""The native builder's pure parts: base references, library checks, config and index."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from mlflow_dock.imaging import layers as layerlib
from mlflow_dock.imaging import native
from mlflow_dock.imaging.baseimage import BaseFacts, BaseImage
from mlflow_dock.imaging.layers import LayerDigests
from mlflow_dock.imaging.wheels import Platform, distributions
from mlflow_dock.jobs.model import JobOutcome
from mlflow_dock.oci.manifest import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Manifest
from mlflow_dock.oci.mutate import write_model_layer
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.serving.layer import layer_files
from mlflow_dock.supply.attach import SupplyChain
from support.disttree import fake_dist
from support.elffiles import tiny_elf64
from support.registry import OciRegistry

AMD64 = Platform.parse("linux/amd64")
ARM64 = Platform.parse("linux/arm64")


def base_image(platform: Platform = AMD64, libraries=("libc.so.6", "libm.so.6")) -> BaseImage:
    config = {
        "architecture": platform.architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C"], "Labels": {"base": "yes"}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
        "history": [{"created_by": "import"}],
        "container_config": {"Cmd": ["sh"]},
    }
    return BaseImage(
        host="registry.test",
        repository="base/debian",
        platform=platform,
        manifest=Manifest.from_bytes(b"{}", "application/vnd.oci.image.manifest.v1+json"),
        config=config,
        layers=({"mediaType": "x", "digest": "sha256:" + "2" * 64, "size": 3},),
        facts=BaseFacts(
            glibc=(2, 36), pythons={"3.11": "/usr/bin/python3.11"}, libraries=frozenset(libraries)
        ),
    )


def test_base_reference_gets_docker_hub_host_and_tag():
    assert str(native.base_reference("python:3.11-slim")) == "docker.io/library/python:3.11-slim"
    assert str(native.base_reference("127.0.0.1:5000/base/deb")) == "127.0.0.1:5000/base/deb:latest"
    assert native.base_reference("ghcr.io/o/img:1").host == "ghcr.io"


def _site(tmp_path: Path, machine: int, needed: list[str], vendored: bool = False) -> Path:
    files = {"lightgbm/lib/lib_lightgbm.so": tiny_elf64(machine, needed)}
    if vendored:
        files["lightgbm.libs/libgomp.so.1"] = tiny_elf64(machine, ["libc.so.6"])
    fake_dist(tmp_path, "lightgbm", "4.6.0", files)
    return tmp_path


def test_missing_library_names_package_and_library(tmp_path: Path):
    site = _site(tmp_path, 62, ["libgomp.so.1", "libc.so.6"])
    with pytest.raises(native.MissingLibrary) as info:
        native.check_libraries(site, distributions(site), base_image(), AMD64)
    assert info.value.package == "lightgbm"
    assert "libgomp.so.1" in str(info.value) and "base/debian" in str(info.value)


def test_library_from_the_base_or_vendored_in_a_wheel_is_fine(tmp_path: Path):
    site = _site(tmp_path / "a", 62, ["libgomp.so.1", "libc.so.6"], vendored=True)
    native.check_libraries(site, distributions(site), base_image(), AMD64)
    site = _site(tmp_path / "b", 62, ["libgomp.so.1"])
    native.check_libraries(site, distributions(site), base_image(libraries=["libgomp.so.1"]), AMD64)


def test_binary_for_another_machine_is_refused(tmp_path: Path):
    site = _site(tmp_path, 62, ["libc.so.6"])
    with pytest.raises(native.NativeNotApplicable, match="x86_64 binary"):
        native.check_libraries(site, distributions(site), base_image(ARM64), ARM64)


def test_config_runs_like_the_engine_runtime():
    layer = LayerDigests("sha256:" + "a" * 64, "sha256:" + "b" * 64, 10)
    config = json.loads(
        native._config(
            base_image(),
            labels={"io.mlflow-dock.model.version": "3"},
            created="2026-01-01T00:00:00Z",
            history=[("venv", layer), ("COPY model/ /opt/ml/model/ # x", layer)],
            env={"MLFLOW_DOCK_V2_MODEL_NAME": "fraud model", "MLFLOW_DOCK_V2_MODEL_VERSION": "3"},
        )
    )
    container = config["config"]
    env = dict(item.split("=", 1) for item in container["Env"])
    assert env["PATH"] == "/opt/mlflow-dock/venv/bin:/usr/bin:/bin"
    assert env["LANG"] == "C.UTF-8" and env["HOME"] == "/home/mlflow"
    assert env["__pyfunc_model_path__"] == "/opt/ml/model"
    # mlflow-dock's server (MLflow's protocol and V2), as the version's V2 model.
    assert env["PYTHONPATH"] == "/opt/mlflow-dock/serving"
    assert env["MLFLOW_DOCK_V2_MODEL_NAME"] == "fraud model"
    assert env["MLFLOW_DOCK_V2_MODEL_VERSION"] == "3"
    assert container["User"] == "10001:10001"
    assert container["Cmd"] == ["python", "-m", "mlflow_dock_serving"]
    assert container["Entrypoint"] is None
    assert container["Labels"] == {"base": "yes", "io.mlflow-dock.model.version": "3"}
    assert config["rootfs"]["diff_ids"] == ["sha256:" + "1" * 64, layer.diff_id, layer.diff_id]
    assert len(config["history"]) == 3 and "container_config" not in config
    assert config["architecture"] == "amd64"


def test_the_serving_layer_is_the_same_blob_for_every_image():
    files = layer_files()

    def pack(files: dict[str, bytes]) -> tuple[bytes, object]:
        out = io.BytesIO()
        digests = layerlib.write_layer(native._serving_entries(files), out)
        return out.getvalue(), digests

    data, digests = pack(files)
    assert pack(dict(files)) == (data, digests)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert set(files) <= set(members)
    assert "opt/mlflow-dock/serving" in members and members["opt"].isdir()
    package = "opt/mlflow-dock/serving/mlflow_dock_serving/"
    assert all(m.mode == 0o644 and m.uid == 0 for n, m in members.items() if n.startswith(package))
    assert len(data) < 100_000  # the whole server: tens of kB compressed, far below 1 MB


def test_index_lists_every_platform():
    one = Manifest.from_bytes(b'{"a":1}', "application/vnd.oci.image.manifest.v1+json")
    two = Manifest.from_bytes(b'{"a":2}', "application/vnd.oci.image.manifest.v1+json")
    index = native._index([(AMD64, one), (ARM64, two)])
    document = json.loads(index.body)
    assert index.media_type == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"]["architecture"] for m in document["manifests"]] == ["amd64", "arm64"]
    assert document["manifests"][1]["digest"] == two.digest


def test_native_runtime_key_differs_from_the_engine_s_and_by_platforms():
    key = native.native_runtime_key("k", (AMD64,))
    assert key != "k"
    assert key != native.native_runtime_key("k", (AMD64, ARM64))
    assert key == native.native_runtime_key("k", (AMD64,))


def build_on(target, base_registry, base_image: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A native build of a one-requirement model whose base is read from `base_registry`."""
    builder = native.NativeBuilder(
        native.NativeConfig(platforms=(AMD64,), cache_dir=tmp_path),
        registry_factory=lambda _host: target,
    )
    return builder.write_image(
        target,
        "models/m",
        native.NativeInputs(
            base_image=base_image,
            model_dir=tmp_path,
            python_version="3.11",
            requirements="x\n",
            labels={},
            work=tmp_path / "work",
            log=lambda _line: None,
        ),
        base_registry=base_registry,
    )


def test_base_missing_from_the_registry_is_not_applicable_so_the_engine_can_try(tmp_path: Path):
    import httpx

    from mlflow_dock.oci.remote import RegistryClient

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
        )

    client = RegistryClient("registry.test", scheme="https", transport=httpx.MockTransport(handler))
    with pytest.raises(native.NativeNotApplicable, match=r"registry\.test/base/deb:1"):
        build_on(client, client, "registry.test/base/deb:1", tmp_path)


def test_missing_library_lists_every_missing_soname(tmp_path: Path):
    fake_dist(
        tmp_path, "lightgbm", "4.6.0", {"lightgbm/lib/a.so": tiny_elf64(62, ["libgomp.so.1"])}
    )
    fake_dist(tmp_path, "scs", "3.2.0", {"scs/b.so": tiny_elf64(62, ["libgfortran.so.5"])})
    with pytest.raises(native.MissingLibrary) as info:
        native.check_libraries(tmp_path, distributions(tmp_path), base_image(), AMD64)
    assert info.value.libraries == ("libgfortran.so.5", "libgomp.so.1")


def test_base_on_an_unreachable_other_registry_is_not_applicable(tmp_path: Path):
    import httpx

    from mlflow_dock.oci.remote import RegistryClient

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Name or service not known", request=request)

    target = RegistryClient(
        "registry.test", scheme="https", transport=httpx.MockTransport(unreachable)
    )
    hub = RegistryClient("docker.io", transport=httpx.MockTransport(unreachable))
    with pytest.raises(native.NativeNotApplicable, match=r"python:3\.11-slim is not readable"):
        build_on(target, hub, "python:3.11-slim", tmp_path)


def test_a_refused_apt_step_leaves_the_whole_engine_build_as_the_way_out(tmp_path: Path):
    from mlflow_dock.errors import PermanentError

    def refused() -> str:
        raise PermanentError("building base: apt-get: command not found")

    builder = native.NativeBuilder(
        native.NativeConfig(platforms=(AMD64,), cache_dir=tmp_path),
        registry_factory=lambda _host: None,  # type: ignore[arg-type,return-value]
    )
    finish = builder._derived(None, base_image(), AMD64, refused, tmp_path, [])  # type: ignore[arg-type]
    with pytest.raises(native.NativeNotApplicable, match="adding OS packages to the base failed"):
        finish()


# --------------------------------------------------------------------------- shared layers


def _base_layer_blob() -> bytes:
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in {
            "var/lib/dpkg/status": b"Package: libc6\nStatus: install ok installed\n"
            b"Version: 2.36-9+deb12u7\n",
            "usr/bin/python3.11": b"",
            "usr/lib/x86_64-linux-gnu/libc.so.6": b"",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def push_base(registry, repository: str = "base/debian") -> str:  # type: ignore[no-untyped-def]
    """A one-layer Debian-like base image in the in-memory registry; its reference."""
    import hashlib

    blob = _base_layer_blob()
    layer = registry.put_blob(repository, blob)
    import gzip

    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "debootstrap"}],
        }
    ).encode()
    config_digest = registry.put_blob(repository, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer,
                "size": len(blob),
            }
        ],
    }
    registry.put_manifest(
        repository,
        json.dumps(manifest).encode(),
        "application/vnd.oci.image.manifest.v1+json",
        tag="bookworm",
    )
    return f"{registry.host}/{repository}:bookworm"


class DictCache:
    """A worker's own layer table, in memory."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], object] = {}

    def get(self, host, key):  # type: ignore[no-untyped-def]
        return self.rows.get((host, key))

    def put(self, host, key, layer, *, label):  # type: ignore[no-untyped-def]
        self.rows[(host, key)] = layer


@pytest.fixture
def fake_uv(monkeypatch):  # type: ignore[no-untyped-def]
    """uv installs one small distribution per requirement line ("name==version")."""

    def install(requirements: str, target_dir: Path, **_kwargs):  # type: ignore[no-untyped-def]
        for line in requirements.split():
            name, _, version = line.partition("==")
            fake_dist(
                target_dir, name, version, {f"{name}/__init__.py": f"{line}\n".encode() * 500}
            )
        return distributions(target_dir)

    monkeypatch.setattr(native.wheels, "install", install)


def fresh_worker(registry, tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    """A worker with nothing of its own: empty data directory, empty table, new process state."""
    from mlflow_dock.imaging.registrycache import RegistryLayerCache
    from mlflow_dock.oci.reference import ImageRef

    builder = native.NativeBuilder(
        native.NativeConfig(platforms=(AMD64,), cache_dir=tmp_path / name / "cache"),
        registry_factory=registry.client,
        cache=DictCache(),
        shared=RegistryLayerCache(ImageRef(f"{registry.host}/team/mlflow-dock-cache")),
    )
    return builder


def build(
    builder, target, base_registry, base: str, repository: str, requirements: str, tmp_path: Path
):  # type: ignore[no-untyped-def]
    model = tmp_path / repository.replace("/", "-") / "model"
    model.mkdir(parents=True)
    (model / "MLmodel").write_text(f"model of {repository}\n")
    lines: list[str] = []
    with target.client() as client, base_registry.client() as base_client:
        result = builder.write_image(
            client,
            repository,
            native.NativeInputs(
                base_image=base,
                model_dir=model,
                python_version="3.11",
                requirements=requirements,
                labels={},
                work=model.parent / "work",
                log=lines.append,
            ),
            base_registry=base_client,
        )
    return result, lines


def layer_digests(registry, repository: str, digest: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [layer["digest"] for layer in registry.doc(repository, digest)["layers"]]


def test_a_fresh_worker_mounts_what_another_worker_pushed_instead_of_packing(
    tmp_path: Path, fake_uv
):
    from support.registry import OciRegistry

    registry = OciRegistry()
    base = push_base(registry)
    first, _ = build(
        fresh_worker(registry, tmp_path, "one"),
        registry,
        registry,
        base,
        "team/model-a",
        "numpy==2.0 scipy==1.14 pkg-a==1",
        tmp_path,
    )
    assert first.counts.tarred == 5  # three packages, the virtualenv and the model server
    second, lines = build(
        fresh_worker(registry, tmp_path, "two"),
        registry,
        registry,
        base,
        "team/model-b",
        "numpy==2.0 scipy==1.14 pkg-b==1",
        tmp_path,
    )
    counts = second.counts
    # Only pkg-b is packed; numpy, scipy, the virtualenv and the server come from the
    # registry's cache.
    assert (counts.tarred, counts.cached) == (1, 4), lines
    assert counts.uploaded == 3  # pkg-b's layer, the model layer, the config
    a = layer_digests(registry, "team/model-a", first.digest)
    b = layer_digests(registry, "team/model-b", second.digest)
    assert len(set(a) & set(b)) == 5  # base, virtualenv, server, numpy, scipy
    assert "1 layer(s) packed, 4 found in the registry's layer cache" in lines[-1]

    # The same worker again (its own table now knows every layer): no lookup in the registry.
    before = len(registry.reads("manifest"))
    worker = fresh_worker(registry, tmp_path, "three")
    build(worker, registry, registry, base, "team/model-c", "numpy==2.0 pkg-b==1", tmp_path)
    looked_up = len(registry.reads("manifest")) - before
    build(worker, registry, registry, base, "team/model-d", "numpy==2.0 pkg-b==1", tmp_path)
    assert len(registry.reads("manifest")) - before == looked_up + 1  # only the base's manifest


def test_layers_of_a_base_on_another_registry_are_copied_once_per_registry(tmp_path: Path, fake_uv):
    from support.registry import OciRegistry

    hub, target = OciRegistry("hub.example.com"), OciRegistry()
    base = push_base(hub, "library/python")
    build(fresh_worker(target, tmp_path, "one"), target, hub, base, "team/a", "x==1", tmp_path)
    layer = hub.doc("library/python", "bookworm")["layers"][0]["digest"]
    # Read twice: once to learn the base's facts (glibc, Python), once to copy it.
    assert hub.reads("blob").count(layer) == 2
    result, _ = build(
        fresh_worker(target, tmp_path, "two"), target, hub, base, "team/b", "x==1", tmp_path
    )
    # A fresh worker learns the facts again (its own cache directory), but mounts the layer
    # from the layer cache instead of copying it through itself.
    assert hub.reads("blob").count(layer) == 3
    # Uploaded: the model layer and config; mounted: the base, x, the virtualenv and the server.
    assert (result.counts.uploaded, result.counts.mounted, result.counts.cached) == (2, 4, 3)
    assert layer_digests(target, "team/b", result.digest)[0] == layer


def test_the_sbom_from_what_was_installed_equals_a_scan_of_the_image(tmp_path: Path):
    """The native builder's knowledge and a layer scan of the very image list the same
    distributions, field for field (licence, archive hash, RECORD as the layer has it)."""
    site = tmp_path / "site"
    direct_url = (
        b'{"url": "https://x/a.whl", "archive_info": {"hashes": {"sha256": "'
        + (b"ab" * 32)
        + b'"}}}'
    )
    fake_dist(
        site,
        "pkg-a",
        "1.0",
        {"pkg_a/__init__.py": b"", "pkg_a-1.0.dist-info/direct_url.json": direct_url},
        scripts={"pkg-a": b"#!/worker/python\nprint()\n"},
    )
    fake_dist(site, "Pkg_B", "2.0.post1", {"pkg_b.py": b"x = 1\n"})
    metadata = site / "Pkg_B-2.0.post1.dist-info" / "METADATA"
    metadata.write_text(
        "Metadata-Version: 2.1\nName: Pkg_B\nVersion: 2.0.post1\n"
        "Classifier: License :: OSI Approved :: MIT License\n\nlong description\n"
    )
    dists = distributions(site)
    layout = layerlib.VenvLayout("/opt/mlflow-dock/venv", "3.11")
    registry = OciRegistry()
    venv = [
        layerlib.Entry("opt/mlflow-dock/venv/pyvenv.cfg", data=b"home = /usr/bin\n"),
        layerlib.Entry(
            "opt/mlflow-dock/venv/bin/python", kind=layerlib.SYMLINK, linkname="/usr/bin/python3.11"
        ),
    ]
    blobs = []
    for entries in (venv, *(layerlib.distribution_entries(d, site, layout) for d in dists)):
        out = io.BytesIO()
        layerlib.write_layer(entries, out)
        blobs.append(out.getvalue())
    model = io.BytesIO()
    model_layer = write_model_layer(_model(tmp_path / "model"), model, target="/opt/ml/model")
    blobs.append(model.getvalue())
    image = push_layers(registry, "team/m", blobs)
    base = base_image()
    known = native._known_contents(
        [native._Plan(AMD64, base, "/usr/bin/python3.11", site, dists)], "3.11", model_layer.digest
    )
    chain = SupplyChain(registry_factory=registry.client, signer=None, tool_version="0")
    documents = []
    for contents in (known, None):
        chain.attach(
            ImageRef(f"{registry.host}/team/m"),
            JobOutcome(image=f"{registry.host}/team/m:1", digest=image),
            lambda _line: None,
            model_name="m",
            model_version="1",
            run_id=None,
            model_source=None,
            requirements_sha256="",
            base_image="base",
            builder="native",
            job_id=None,
            contents=contents,
        )
        manifest = registry.doc("team/m", f"sha256-{image[7:]}.sbom")
        documents.append(json.loads(registry.blobs[("team/m", manifest["layers"][0]["digest"])]))
    as_built, scanned = (
        [c for c in d["components"] if c["bom-ref"] != "base-image"] for d in documents
    )
    assert as_built == scanned
    assert [c["name"] for c in as_built if c["type"] == "library"] == ["pkg-a", "Pkg_B"]
    assert known.base is not None and known.base.digest == (
        f"registry.test/base/debian@{base.manifest.digest}"
    )


def _model(root: Path) -> Path:
    root.mkdir()
    (root / "MLmodel").write_text("flavors: {}\n")
    return root


def push_layers(registry: OciRegistry, repository: str, blobs: list[bytes]) -> str:
    """A native-like image of ``blobs`` (gzip layers) whose python is the virtualenv's."""
    diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(b)).hexdigest() for b in blobs]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/opt/mlflow-dock/venv/bin:/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": registry.put_blob(repository, config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": OCI_LAYER, "digest": registry.put_blob(repository, b), "size": len(b)}
            for b in blobs
        ],
    }
    return registry.put_manifest(repository, json.dumps(document).encode(), OCI_MANIFEST, tag="1")
