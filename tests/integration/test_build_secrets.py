"""Index credentials and the build CA bundle reach the installer, and nothing published.

A private index (PyPI behind basic auth on loopback, tests/support/pyindex.py) whose URL carries
a recognisable token, and a CA bundle with a recognisable marker line, are configured; each
builder (native, layered, MLflow's stock) builds one version through the service. The index must
have seen the token (it refuses requests without it), and then every blob of everything in the
target repository (image configs with their history, every layer decompressed, SBOM and
signature artifacts) is read back from the registry and searched for the token and the marker,
as are the job's log and records, the service's log and its data directory.
"""

from __future__ import annotations

import gzip
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlflow_dock.oci import reference as naming
from support.jobs import build_of, created_payload, job_detail, signed_delivery, wait_for_job
from support.pyindex import PrivateIndex, start_private_index
from support.servers import SYSTEM_CA_BUNDLE, log_sklearn_model, register_model_version

pytestmark = pytest.mark.integration

_MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


@pytest.fixture(scope="module")
def private_index() -> Iterator[PrivateIndex]:
    index = start_private_index(SYSTEM_CA_BUNDLE)
    yield index
    index.stop()


@pytest.fixture(scope="module")
def logged_model(mlflow_server: Any) -> tuple[str, str]:
    """One logged sklearn model; each test registers a version of its own model from it."""
    name = f"Dock secrets source {secrets.token_hex(4)}"
    return name, log_sklearn_model(mlflow_server.url, name)


@pytest.fixture
def marked_ca_bundle(tmp_path: Path) -> tuple[Path, str]:
    """The system CA bundle plus a comment line no image may contain (PEM readers skip it)."""
    marker = f"mlflow-dock-ca-marker-{secrets.token_hex(8)}"
    path = tmp_path / "build-ca.pem"
    path.write_text(SYSTEM_CA_BUNDLE.read_text() + f"\n# {marker}\n")
    return path, marker


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


@pytest.mark.parametrize("builder", ["native", "layered", "mlflow"])
def test_index_credentials_and_ca_bundle_are_in_nothing_published(
    builder: str,
    service_factory: Any,
    mlflow_server: Any,
    registry: Any,
    private_index: PrivateIndex,
    marked_ca_bundle: tuple[Path, str],
    logged_model: tuple[str, str],
    model_name: str,
) -> None:
    ca_bundle, marker = marked_ca_bundle
    service = service_factory(
        MLFLOW_DOCK_BUILDER=builder,
        MLFLOW_DOCK_PIP_INDEX_URL=private_index.url,
        MLFLOW_DOCK_BUILD_CA_BUNDLE=str(ca_bundle),
        MLFLOW_DOCK_BUILD_NETWORK="host",  # the private index listens on loopback
        MLFLOW_DOCK_SMOKE_TEST="false",  # what runs the image is not the point here
        MLFLOW_DOCK_ENGINE_FALLBACK="false",  # native must stay native
    )
    source, source_version = logged_model
    version = register_model_version(
        mlflow_server.url, model_name, from_model=source, from_version=source_version
    )
    seen_before = len(private_index.authorized)
    payload = created_payload(model_name, version)
    answer = signed_delivery(service, service_factory.secret, payload)
    assert answer.status_code == 202, answer.text
    job = wait_for_job(service, build_of(model_name, version))
    detail = job_detail(service, job["id"], log_lines=5000)
    assert job["state"] == "succeeded", detail["log_tail"][-40:]
    # The installer used the credentials (the index refuses requests without them).
    assert len(private_index.authorized) > seen_before

    needles = (private_index.token.encode(), marker.encode())
    blobs = list(_blobs(registry, naming.repository_name(model_name)))
    for what, data in blobs:
        assert not any(needle in data for needle in needles), f"{builder}: secret in {what}"
    # The search sees what it must: the model's files in a layer, the labels in the config.
    assert any(b"python_function" in data for what, data in blobs if what.startswith("layer"))
    assert any(model_name.encode() in data for what, data in blobs if what.startswith("config"))

    records = httpx.get(f"{service.url}/builds", params={"model": model_name}, timeout=10).text
    for text in ("\n".join(detail["log_tail"]), json.dumps(detail), records, service.log_text()):
        assert private_index.token not in text and marker not in text
    # The service's files: job store, work directories, and the (shared) uv cache.
    for directory in ("MLFLOW_DOCK_DATA_DIR", "MLFLOW_DOCK_CACHE_DIR"):
        if directory in service.env:
            assert _files_containing(Path(service.env[directory]), needles) == []
