"""Facts about a base image from its layer tars: glibc, Python location, shared libraries."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.baseimage import (
    BaseFacts,
    BaseImage,
    NotNativeBase,
    resolve_base,
    scan_layers,
)
from mlflow_dock.imaging.wheels import Platform
from mlflow_dock.oci.manifest import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Manifest
from support.registry import OciRegistry

DPKG_STATUS = b"""\
Package: libc6
Status: install ok installed
Version: 2.36-9+deb12u7
Description: GNU C Library
 long description: Version: 9.99

Package: python3.11
Version: 3.11.2-6
"""


def layer(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return gzip.compress(raw.getvalue())


def test_debian_python_glibc_and_libraries():
    facts = scan_layers(
        [
            layer(
                {
                    "var/lib/dpkg/status": DPKG_STATUS,
                    "usr/lib/x86_64-linux-gnu/libc.so.6": b"",
                    "./usr/lib/x86_64-linux-gnu/libz.so.1.2.13": b"",
                },
                {"usr/bin/python3.11": "python3.11", "usr/lib/x86_64-linux-gnu/libz.so.1": "x"},
            )
        ]
    )
    assert facts.glibc == (2, 36)
    assert facts.pythons == {"3.11": "/usr/bin/python3.11"}
    assert {"libc.so.6", "libz.so.1"} <= facts.libraries
    assert BaseFacts.from_json(facts.to_json()) == facts


def test_official_python_image_wins_and_later_layers_whiteout():
    facts = scan_layers(
        [
            layer(
                {"var/lib/dpkg/status": DPKG_STATUS, "usr/bin/python3.11": b"", "lib/a.so.1": b""}
            ),
            layer({"usr/local/bin/python3.11": b"", "lib/.wh.a.so.1": b""}),
        ]
    )
    assert facts.pythons["3.11"] == "/usr/local/bin/python3.11"
    assert "a.so.1" not in facts.libraries


def test_image_without_glibc_is_refused():
    with pytest.raises(NotNativeBase, match="libc"):
        scan_layers([layer({"usr/bin/python3.12": b"", "lib/ld-musl-x86_64.so.1": b""})])


def test_missing_python_version_names_what_there_is():
    facts = BaseFacts(glibc=(2, 36), pythons={"3.11": "/usr/bin/python3.11"}, libraries=frozenset())
    base = BaseImage(
        host="r",
        repository="base",
        platform=Platform.parse("linux/amd64"),
        manifest=Manifest.from_bytes(b"{}", "application/vnd.oci.image.manifest.v1+json"),
        config={},
        layers=(),
        facts=facts,
    )
    assert base.python_for("3.11.7") == "/usr/bin/python3.11"
    with pytest.raises(NotNativeBase, match=r"no Python 3\.12 \(it has: 3\.11\)"):
        base.python_for("3.12")


def test_glibc_from_the_library_banner_without_dpkg():
    banner = b"\0GNU C Library (Debian GLIBC 2.36-9+deb12u7) stable release version 2.36.\n"
    facts = scan_layers([layer({"usr/lib/aarch64-linux-gnu/libc.so.6": b"\x7fELF" + banner})])
    assert facts.glibc == (2, 36)


def test_layers_on_a_known_base_inherit_its_facts():
    below = BaseFacts(
        glibc=(2, 36), pythons={"3.11": "/usr/bin/python3.11"}, libraries=frozenset({"libc.so.6"})
    )
    facts = scan_layers(
        [
            layer(
                {"usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0": b""},
                {"usr/lib/x86_64-linux-gnu/libgomp.so.1": "x"},
            )
        ],
        below=below,
    )
    assert facts.glibc == (2, 36) and facts.pythons == below.pythons
    assert {"libc.so.6", "libgomp.so.1"} <= facts.libraries


class _Registry:
    """One single-platform base image, served from memory (what resolve_base reads)."""

    host = "registry.example"

    def __init__(self, blob: bytes) -> None:
        self.blobs = {"sha256:layer": blob, "sha256:config": b'{"architecture": "amd64"}'}
        document = {
            "config": {"digest": "sha256:config"},
            "layers": [{"digest": "sha256:layer", "size": len(blob)}],
        }
        body = json.dumps(document).encode()
        self.manifest = Manifest(
            body,
            "application/vnd.oci.image.manifest.v1+json",
            "sha256:" + hashlib.sha256(body).hexdigest(),
        )
        self.arrived = threading.Barrier(4, timeout=10)

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        return self.manifest

    def get_blob(self, repository: str, digest: str) -> bytes:
        if digest == "sha256:layer":
            self.arrived.wait()  # every writer scans at once, then all write the cache
        return self.blobs[digest]

    def open_blob(self, repository: str, digest: str, size: int | None = None) -> io.BytesIO:
        return io.BytesIO(self.get_blob(repository, digest))


def test_first_builds_on_one_base_write_the_facts_cache_without_racing(tmp_path):
    blob = layer({"var/lib/dpkg/status": DPKG_STATUS, "usr/bin/python3.11": b""})
    registry = _Registry(blob)
    cache = tmp_path / "cache"
    cache.mkdir()
    stem = registry.manifest.digest.replace(":", "-")
    # The name a fixed temporary file had: whoever holds it must not matter any more.
    (cache / f"{stem}.tmp").mkdir()
    linux = Platform.parse("linux/amd64")
    with ThreadPoolExecutor(4) as pool:
        found = list(
            pool.map(
                lambda _: resolve_base(registry, "base", "latest", linux, cache_dir=cache),  # type: ignore[arg-type]
                range(4),
            )
        )
    assert {image.facts.glibc for image in found} == {(2, 36)}
    assert sorted(path.name for path in cache.iterdir()) == [f"{stem}.json", f"{stem}.tmp"]


def test_base_layers_are_read_through_the_registry_as_checked_streams(tmp_path):
    registry = OciRegistry()
    plain = layer({"usr/lib/x86_64-linux-gnu/libgomp.so.1": b"x" * 100})
    bottom = layer({"var/lib/dpkg/status": DPKG_STATUS, "usr/bin/python3.11": b""})
    layers = [gzip.decompress(plain), bottom]  # an uncompressed layer reads as well
    config = b'{"architecture": "amd64", "os": "linux"}'
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": registry.put_blob("base", config),
            "size": 40,
        },
        "layers": [
            {"mediaType": OCI_LAYER, "digest": registry.put_blob("base", blob), "size": len(blob)}
            for blob in layers
        ],
    }
    registry.put_manifest("base", json.dumps(document).encode(), OCI_MANIFEST, tag="latest")
    linux = Platform.parse("linux/amd64")
    with registry.client() as client:
        found = resolve_base(client, "base", "latest", linux, cache_dir=tmp_path / "a")
        assert found.facts.glibc == (2, 36) and "libgomp.so.1" in found.facts.libraries
        first = ("base", document["layers"][0]["digest"])
        registry.blobs[first] = registry.blobs[first].replace(b"x" * 100, b"y" * 100)
        with pytest.raises(PermanentError, match="content digest"):
            resolve_base(client, "base", "latest", linux, cache_dir=tmp_path / "b")
