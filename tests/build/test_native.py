"""The native builder's pure parts: base references, library checks, config and index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow_dock.build import native
from mlflow_dock.build.baseimage import BaseFacts, BaseImage
from mlflow_dock.build.layers import LayerDigests
from mlflow_dock.build.wheels import Platform, distributions
from mlflow_dock.oci.manifest import Manifest
from support.disttree import fake_dist
from support.elffiles import tiny_elf64

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
        )
    )
    container = config["config"]
    env = dict(item.split("=", 1) for item in container["Env"])
    assert env["PATH"] == "/opt/mlflow-dock/venv/bin:/usr/bin:/bin"
    assert env["LANG"] == "C.UTF-8" and env["HOME"] == "/home/mlflow"
    assert env["__pyfunc_model_path__"] == "/opt/ml/model"
    assert container["User"] == "10001:10001"
    assert "uvicorn" in " ".join(container["Cmd"]) and container["Entrypoint"] is None
    assert container["Labels"] == {"base": "yes", "io.mlflow-dock.model.version": "3"}
    assert config["rootfs"]["diff_ids"] == ["sha256:" + "1" * 64, layer.diff_id, layer.diff_id]
    assert len(config["history"]) == 3 and "container_config" not in config
    assert config["architecture"] == "amd64"


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
    builder = native.NativeBuilder(native.NativeConfig(platforms=(AMD64,), cache_dir=tmp_path))
    return builder.build(
        target,
        "models/m",
        base_registry=base_registry,
        base_image=base_image,
        model_dir=tmp_path,
        python_version="3.11",
        requirements="x\n",
        labels={},
        work=tmp_path / "work",
        log=lambda _line: None,
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

    builder = native.NativeBuilder(native.NativeConfig(platforms=(AMD64,), cache_dir=tmp_path))
    finish = builder._derived(None, base_image(), AMD64, refused, tmp_path, [])  # type: ignore[arg-type]
    with pytest.raises(native.NativeNotApplicable, match="adding OS packages to the base failed"):
        finish()
