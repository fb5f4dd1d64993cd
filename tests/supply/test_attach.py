"""SupplyChain.attach against an in-memory registry (httpx.MockTransport behind RegistryClient).

The live test (tests/integration/test_supply_chain_live.py) runs it on a real Distribution;
these pin down what a real registry will not do on demand: a referrers API, a retried job,
signatures someone else made, layers we cannot read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mlflow_dock.jobs.model import JobOutcome
from mlflow_dock.oci.manifest import OCI_INDEX, OCI_MANIFEST
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.oci.remote import RegistryClient
from mlflow_dock.supply.attach import SupplyChain, SupplyError
from mlflow_dock.supply.signing import Signer, simple_signing_payload

HOST = "registry.example.com"
REPO = "team/iris"
SITE = "opt/venv/lib/python3.11/site-packages"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MemoryRegistry:
    """Just enough of the distribution API: manifests by tag or digest, blobs, uploads."""

    def __init__(self, *, referrers_api: bool = False) -> None:
        self.referrers_api = referrers_api
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}  # digest -> (media type, body)
        self.tags: dict[str, str] = {}
        self.blob_reads: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if m := re.fullmatch(rf"/v2/{REPO}/manifests/(.+)", path):
            ref = m.group(1)
            if request.method == "PUT":
                digest = sha(request.content)
                self.manifests[digest] = (request.headers["Content-Type"], request.content)
                if not ref.startswith("sha256:"):
                    self.tags[ref] = digest
                return httpx.Response(201, headers={"Docker-Content-Digest": digest})
            digest = ref if ref.startswith("sha256:") else self.tags.get(ref, "")
            if digest not in self.manifests:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            media_type, body = self.manifests[digest]
            headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
            return httpx.Response(200, headers=headers, content=body)
        if m := re.fullmatch(rf"/v2/{REPO}/referrers/(.+)", path):
            if not self.referrers_api:
                return httpx.Response(404)
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            return httpx.Response(200, headers={"Content-Type": OCI_INDEX}, json=index)
        if m := re.fullmatch(rf"/v2/{REPO}/blobs/(sha256:[0-9a-f]+)", path):
            digest = m.group(1)
            if digest not in self.blobs:
                return httpx.Response(404)
            if request.method == "GET":
                self.blob_reads.append(digest)
            return httpx.Response(
                200, content=self.blobs[digest] if request.method == "GET" else b""
            )
        if path == f"/v2/{REPO}/blobs/uploads/" and request.method == "POST":
            return httpx.Response(202, headers={"Location": f"/v2/{REPO}/blobs/uploads/u1"})
        if path == f"/v2/{REPO}/blobs/uploads/u1" and request.method == "PUT":
            self.blobs[request.url.params["digest"]] = request.content
            return httpx.Response(201)
        return httpx.Response(400)

    def client(self, _host: str) -> RegistryClient:
        return RegistryClient(HOST, scheme="https", transport=httpx.MockTransport(self.handler))

    def push_image(self, layer_entries: dict[str, bytes], *, raw_layer: bytes | None = None) -> str:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as archive:
            for name, content in layer_entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
        layer = gzip.compress(raw.getvalue()) if raw_layer is None else raw_layer
        config = json.dumps(
            {"created": "2026-01-01T00:00:00Z", "config": {"Env": ["PATH=/opt/venv/bin:/usr/bin"]}}
        ).encode()
        self.blobs[sha(layer)] = layer
        self.blobs[sha(config)] = config
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha(layer),
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        self.manifests[sha(manifest)] = (OCI_MANIFEST, manifest)
        self.tags["1"] = sha(manifest)
        return sha(manifest)

    def doc(self, tag: str) -> dict:
        return json.loads(self.manifests[self.tags[tag]][1])


IMAGE_FILES = {
    "opt/venv/bin/python": b"",
    f"{SITE}/numpy-2.0.dist-info/METADATA": b"Name: numpy\nVersion: 2.0\nLicense: BSD\n",
    f"{SITE}/numpy-2.0.dist-info/RECORD": b"numpy/__init__.py,,\n",
    "opt/ml/model/MLmodel": b"flavors: {}\n",
}


def attach(chain: SupplyChain, digest: str) -> JobOutcome:
    return chain.attach(
        ImageRef(f"{HOST}/{REPO}"),
        JobOutcome(image=f"{HOST}/{REPO}:1", digest=digest),
        lambda _line: None,
        model_name="iris",
        model_version="1",
        run_id="run",
        model_source="models:/m",
        requirements_sha256="00" * 32,
        base_image="python:3.11-slim",
        builder="layered",
        job_id="job",
    )


@pytest.fixture
def signer() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP256R1()))


def chain_for(registry: MemoryRegistry, signer: Signer | None, tmp_path: Path) -> SupplyChain:
    return SupplyChain(
        registry_factory=registry.client,
        signer=signer,
        tool_version="0.1.0",
        cache_dir=tmp_path / "scans",
        resolve_base=lambda _ref: "python@sha256:" + "12" * 32,
    )


def test_fallback_registry_gets_cosign_tags_and_the_referrers_index(tmp_path, signer):
    registry = MemoryRegistry()
    digest = registry.push_image(IMAGE_FILES)
    outcome = attach(chain_for(registry, signer, tmp_path), digest)
    hexdigest = digest[7:]
    index = registry.doc(f"sha256-{hexdigest}")
    assert {d["digest"] for d in index["manifests"]} == {
        registry.tags[f"sha256-{hexdigest}.{s}"] for s in ("sbom", "sig", "att")
    }
    assert outcome.sbom == f"{HOST}/{REPO}@{registry.tags[f'sha256-{hexdigest}.sbom']}"
    assert outcome.signature == f"{HOST}/{REPO}@{registry.tags[f'sha256-{hexdigest}.sig']}"
    sbom_layer = registry.doc(f"sha256-{hexdigest}.sbom")["layers"][0]
    bom = json.loads(registry.blobs[sbom_layer["digest"]])
    libraries = [c for c in bom["components"] if c["type"] == "library"]
    assert [(c["name"], c["version"]) for c in libraries] == [("numpy", "2.0")]


def test_referrers_api_registry_gets_no_fallback_index(tmp_path, signer):
    registry = MemoryRegistry(referrers_api=True)
    digest = registry.push_image(IMAGE_FILES)
    attach(chain_for(registry, signer, tmp_path), digest)
    assert f"sha256-{digest[7:]}" not in registry.tags
    # cosign looks only at its own tags unless told otherwise, so those stay.
    assert f"sha256-{digest[7:]}.sig" in registry.tags


def test_unsigned_without_a_key(tmp_path):
    registry = MemoryRegistry()
    digest = registry.push_image(IMAGE_FILES)
    outcome = attach(chain_for(registry, None, tmp_path), digest)
    assert outcome.sbom and outcome.signature is None and outcome.provenance is None
    assert f"sha256-{digest[7:]}.sig" not in registry.tags
    assert len(registry.doc(f"sha256-{digest[7:]}")["manifests"]) == 1


def test_retry_reuses_the_signature_keeps_foreign_ones_and_reads_no_layer_again(tmp_path, signer):
    registry = MemoryRegistry()
    digest = registry.push_image(IMAGE_FILES)
    chain = chain_for(registry, signer, tmp_path)
    first = attach(chain, digest)
    layer_digest = registry.doc("1")["layers"][0]["digest"]
    assert registry.blob_reads.count(layer_digest) == 1
    # Someone else signs the image too (cosign appends a layer to the .sig manifest).
    other = Signer(ec.generate_private_key(ec.SECP256R1()))
    sig_tag = f"sha256-{digest[7:]}.sig"
    doc = registry.doc(sig_tag)
    payload = simple_signing_payload(f"{HOST}/{REPO}", digest) + b" "
    registry.blobs[sha(payload)] = payload
    doc["layers"].append(
        {
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": sha(payload),
            "size": len(payload),
            "annotations": {"dev.cosignproject.cosign/signature": other.sign_b64(payload)},
        }
    )
    body = json.dumps(doc).encode()
    registry.manifests[sha(body)] = (OCI_MANIFEST, body)
    registry.tags[sig_tag] = sha(body)

    second = attach(chain, digest)
    assert second.sbom == first.sbom  # the same bytes: the SBOM is deterministic
    layers = registry.doc(sig_tag)["layers"]
    assert len(layers) == 2  # ours (not re-signed) and the foreign one
    ours = registry.doc(sig_tag)["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"]
    first_sig_layers = json.loads(registry.manifests[first.signature.split("@")[1]][1])["layers"]
    assert ours == first_sig_layers[0]["annotations"]["dev.cosignproject.cosign/signature"]
    assert registry.blob_reads.count(layer_digest) == 1  # the layer scan came from the cache
    index = registry.doc(f"sha256-{digest[7:]}")
    kinds = [d["annotations"]["dev.mlflow-dock.artifact"] for d in index["manifests"]]
    assert sorted(kinds) == ["provenance", "sbom", "signature"]  # replaced, not piled up


def test_unreadable_layer_is_a_supply_error(tmp_path):
    registry = MemoryRegistry()
    digest = registry.push_image({}, raw_layer=b"not a tarball" * 100)
    with pytest.raises(SupplyError, match="cannot read layer"):
        attach(chain_for(registry, None, tmp_path), digest)


def test_a_multi_platform_index_is_described_by_its_amd64_image(tmp_path, signer):
    registry = MemoryRegistry()
    image = registry.push_image(IMAGE_FILES)
    arm = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    registry.manifests[sha(arm)] = (OCI_MANIFEST, arm)
    platforms = [("arm64", sha(arm)), ("amd64", image)]
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": arch},
                }
                for arch, digest in platforms
            ],
        }
    ).encode()
    registry.manifests[sha(body)] = (OCI_INDEX, body)
    attach(chain_for(registry, signer, tmp_path), sha(body))
    sbom = registry.doc(f"sha256-{sha(body)[7:]}.sbom")
    assert sbom["subject"]["digest"] == sha(body)
    assert sbom["subject"]["mediaType"] == OCI_INDEX
    bom = json.loads(registry.blobs[sbom["layers"][0]["digest"]])
    assert [c["name"] for c in bom["components"] if c["type"] == "library"] == ["numpy"]


def test_an_empty_index_is_a_supply_error(tmp_path):
    registry = MemoryRegistry()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    registry.manifests[sha(body)] = (OCI_INDEX, body)
    with pytest.raises(SupplyError, match="index of no images"):
        attach(chain_for(registry, None, tmp_path), sha(body))


@pytest.mark.parametrize(
    ("repository", "expected"),
    [
        ("registry.example.com/team/iris", "registry.example.com/team/iris"),
        ("127.0.0.1:5000/iris", "127.0.0.1:5000/iris"),
        ("docker.io/team/iris", "index.docker.io/team/iris"),
    ],
)
def test_payload_names_the_repository_as_cosign_does(repository, expected):
    from mlflow_dock.supply.attach import _docker_reference

    assert _docker_reference(ImageRef(repository)) == expected


def test_workers_sharing_a_data_directory_cache_the_same_layer_scan_at_once(tmp_path):
    """Each writer renames a file of its own: none finds its partial file taken by another."""
    import threading

    from mlflow_dock.supply.attach import _ScanCache
    from mlflow_dock.supply.layers import LayerScan

    caches = [_ScanCache(tmp_path) for _ in range(8)]
    errors: list[BaseException] = []

    def put(cache: _ScanCache) -> None:
        try:
            for _ in range(50):
                cache.put("sha256:" + "a" * 64, LayerScan())
        except BaseException as exc:  # the test reports it below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["sha256-" + "a" * 64 + ".json"]
