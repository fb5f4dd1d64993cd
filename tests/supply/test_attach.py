"""SupplyChain.attach against the shared in-memory registry (tests/support/registry.py, an
httpx.MockTransport behind RegistryClient).

The live test (tests/integration/test_supply_chain_live.py) runs it on a real Distribution;
these pin down what a real registry will not do on demand: a referrers API, a retried job,
signatures someone else made, layers we cannot read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mlflow_dock.jobs.model import JobOutcome
from mlflow_dock.oci.manifest import OCI_INDEX, OCI_MANIFEST
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.supply import sbom
from mlflow_dock.supply.attach import SupplyChain, SupplyError
from mlflow_dock.supply.sbom import KnownContents
from mlflow_dock.supply.signing import Signer, simple_signing_payload
from support.registry import OciRegistry

HOST = "registry.example.com"
REPO = "team/iris"
SITE = "opt/venv/lib/python3.11/site-packages"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image(
    registry: OciRegistry, layer_entries: dict[str, bytes], *, raw_layer: bytes | None = None
) -> str:
    """Store a one-layer image tagged "1", as a build would have pushed it; returns its digest."""
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
    registry.put_blob(REPO, layer)
    registry.put_blob(REPO, config)
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
    return registry.put_manifest(REPO, manifest, OCI_MANIFEST, tag="1")


IMAGE_FILES = {
    "opt/venv/bin/python": b"",
    f"{SITE}/numpy-2.0.dist-info/METADATA": b"Name: numpy\nVersion: 2.0\nLicense: BSD\n",
    f"{SITE}/numpy-2.0.dist-info/RECORD": b"numpy/__init__.py,,\n",
    "opt/ml/model/MLmodel": b"flavors: {}\n",
}


def attach(
    chain: SupplyChain,
    digest: str,
    *,
    contents: KnownContents | None = None,
    log: list[str] | None = None,
) -> JobOutcome:
    return chain.attach(
        ImageRef(f"{HOST}/{REPO}"),
        JobOutcome(image=f"{HOST}/{REPO}:1", digest=digest),
        (log if log is not None else []).append,
        model_name="iris",
        model_version="1",
        run_id="run",
        model_source="models:/m",
        requirements_sha256="00" * 32,
        base_image="python:3.11-slim",
        builder="layered",
        job_id="job",
        contents=contents,
    )


@pytest.fixture
def signer() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP256R1()))


def chain_for(registry: OciRegistry, signer: Signer | None, tmp_path: Path) -> SupplyChain:
    return SupplyChain(
        registry_factory=registry.client,
        signer=signer,
        tool_version="0.1.0",
        cache_dir=tmp_path / "scans",
        resolve_base=lambda _ref: "python@sha256:" + "12" * 32,
    )


def test_fallback_registry_gets_cosign_tags_and_the_referrers_index(tmp_path, signer):
    registry = OciRegistry()
    digest = push_image(registry, IMAGE_FILES)
    outcome = attach(chain_for(registry, signer, tmp_path), digest)
    hexdigest = digest[7:]
    index = registry.doc(REPO, f"sha256-{hexdigest}")
    assert {d["digest"] for d in index["manifests"]} == {
        registry.tags[(REPO, f"sha256-{hexdigest}.{s}")] for s in ("sbom", "sig", "att")
    }
    assert outcome.sbom == f"{HOST}/{REPO}@{registry.tags[(REPO, f'sha256-{hexdigest}.sbom')]}"
    assert outcome.signature == f"{HOST}/{REPO}@{registry.tags[(REPO, f'sha256-{hexdigest}.sig')]}"
    sbom_layer = registry.doc(REPO, f"sha256-{hexdigest}.sbom")["layers"][0]
    bom = json.loads(registry.blobs[(REPO, sbom_layer["digest"])])
    libraries = [c for c in bom["components"] if c["type"] == "library"]
    assert [(c["name"], c["version"]) for c in libraries] == [("numpy", "2.0")]


def test_referrers_api_registry_gets_no_fallback_index(tmp_path, signer):
    registry = OciRegistry(referrers_api=True)
    digest = push_image(registry, IMAGE_FILES)
    attach(chain_for(registry, signer, tmp_path), digest)
    assert (REPO, f"sha256-{digest[7:]}") not in registry.tags
    # cosign looks only at its own tags unless told otherwise, so those stay.
    assert (REPO, f"sha256-{digest[7:]}.sig") in registry.tags


def test_unsigned_without_a_key(tmp_path):
    registry = OciRegistry()
    digest = push_image(registry, IMAGE_FILES)
    outcome = attach(chain_for(registry, None, tmp_path), digest)
    assert outcome.sbom and outcome.signature is None and outcome.provenance is None
    assert (REPO, f"sha256-{digest[7:]}.sig") not in registry.tags
    assert len(registry.doc(REPO, f"sha256-{digest[7:]}")["manifests"]) == 1


def test_retry_reuses_the_signature_keeps_foreign_ones_and_reads_no_layer_again(tmp_path, signer):
    registry = OciRegistry()
    digest = push_image(registry, IMAGE_FILES)
    chain = chain_for(registry, signer, tmp_path)
    first = attach(chain, digest)
    layer_digest = registry.doc(REPO, "1")["layers"][0]["digest"]
    assert registry.reads("blob").count(layer_digest) == 1
    # Someone else signs the image too (cosign appends a layer to the .sig manifest).
    other = Signer(ec.generate_private_key(ec.SECP256R1()))
    sig_tag = f"sha256-{digest[7:]}.sig"
    doc = registry.doc(REPO, sig_tag)
    payload = simple_signing_payload(f"{HOST}/{REPO}", digest) + b" "
    registry.put_blob(REPO, payload)
    doc["layers"].append(
        {
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": sha(payload),
            "size": len(payload),
            "annotations": {"dev.cosignproject.cosign/signature": other.sign_b64(payload)},
        }
    )
    body = json.dumps(doc).encode()
    registry.put_manifest(REPO, body, OCI_MANIFEST, tag=sig_tag)

    second = attach(chain, digest)
    assert second.sbom == first.sbom  # the same bytes: the SBOM is deterministic
    layers = registry.doc(REPO, sig_tag)["layers"]
    assert len(layers) == 2  # ours (not re-signed) and the foreign one
    ours = registry.doc(REPO, sig_tag)["layers"][0]["annotations"][
        "dev.cosignproject.cosign/signature"
    ]
    first_sig_layers = registry.doc(REPO, first.signature.split("@")[1])["layers"]
    assert ours == first_sig_layers[0]["annotations"]["dev.cosignproject.cosign/signature"]
    assert registry.reads("blob").count(layer_digest) == 1  # the layer scan came from the cache
    index = registry.doc(REPO, f"sha256-{digest[7:]}")
    kinds = [d["annotations"]["dev.mlflow-dock.artifact"] for d in index["manifests"]]
    assert sorted(kinds) == ["provenance", "sbom", "signature"]  # replaced, not piled up


def test_unreadable_layer_is_a_supply_error(tmp_path):
    registry = OciRegistry()
    digest = push_image(registry, {}, raw_layer=b"not a tarball" * 100)
    with pytest.raises(SupplyError, match="cannot read layer"):
        attach(chain_for(registry, None, tmp_path), digest)


def test_a_multi_platform_index_is_described_by_its_amd64_image(tmp_path, signer):
    registry = OciRegistry()
    image = push_image(registry, IMAGE_FILES)
    arm = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    registry.put_manifest(REPO, arm, OCI_MANIFEST)
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
    registry.put_manifest(REPO, body, OCI_INDEX)
    attach(chain_for(registry, signer, tmp_path), sha(body))
    sbom = registry.doc(REPO, f"sha256-{sha(body)[7:]}.sbom")
    assert sbom["subject"]["digest"] == sha(body)
    assert sbom["subject"]["mediaType"] == OCI_INDEX
    bom = json.loads(registry.blobs[(REPO, sbom["layers"][0]["digest"])])
    assert [c["name"] for c in bom["components"] if c["type"] == "library"] == ["numpy"]


def test_an_empty_index_is_a_supply_error(tmp_path):
    registry = OciRegistry()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    registry.put_manifest(REPO, body, OCI_INDEX)
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


# --------------------------------------------------------------------------- builder knowledge


def sbom_of(registry: OciRegistry, digest: str) -> dict:  # type: ignore[type-arg]
    manifest = registry.doc(REPO, f"sha256-{digest[7:]}.sbom")
    return json.loads(registry.blobs[(REPO, manifest["layers"][0]["digest"])])


def libraries(document: dict) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(c["name"], c["version"]) for c in document["components"] if c["type"] == "library"]


KNOWN = sbom.Distribution(
    name="scikit-learn",
    version="1.5.0",
    site_dir=SITE,
    licenses=({"expression": "BSD-3-Clause"},),
    record_sha256="ab" * 32,
    installer="uv",
)


def test_what_the_builder_installed_is_listed_without_reading_a_layer(tmp_path):
    registry = OciRegistry()
    digest = push_image(registry, IMAGE_FILES)
    layer = registry.doc(REPO, "1")["layers"][0]["digest"]
    base = sbom.BaseImage("reg/base", "reg/base@sha256:" + "77" * 32)
    log: list[str] = []
    contents = KnownContents(model_layer=layer, distributions=(KNOWN,), base=base)
    attach(chain_for(registry, None, tmp_path), digest, contents=contents, log=log)
    assert layer not in registry.reads("blob")
    document = sbom_of(registry, digest)
    assert libraries(document) == [("scikit-learn", "1.5.0")]
    model = next(c for c in document["components"] if c["bom-ref"] == "model")
    assert model["hashes"] == [{"alg": "SHA-256", "content": layer[7:]}]
    # The base's registry digest, as the builder read it (not the engine's idea of it).
    base_component = next(c for c in document["components"] if c["bom-ref"] == "base-image")
    assert base_component["hashes"] == [{"alg": "SHA-256", "content": "77" * 32}]
    assert "1 Python packages, as built" in log[-1]


def test_an_assembled_version_lists_the_packages_of_its_earlier_images_sbom(tmp_path, signer):
    registry = OciRegistry()
    chain = chain_for(registry, signer, tmp_path)
    first = push_image(registry, IMAGE_FILES)
    attach(chain, first)  # read from the layers: numpy
    layer = registry.doc(REPO, "1")["layers"][0]["digest"]
    reads = registry.reads("blob").count(layer)
    # Version 2: the same runtime, another model (a manifest of its own, same layer here).
    body = json.loads(registry.manifest(REPO, "1")[0])
    body["annotations"] = {"version": "2"}
    second = registry.put_manifest(REPO, json.dumps(body).encode(), OCI_MANIFEST)
    log: list[str] = []
    contents = KnownContents(model_layer=layer, packages_of=first)
    attach(chain, second, contents=contents, log=log)
    assert registry.reads("blob").count(layer) == reads  # no layer read again
    assert libraries(sbom_of(registry, second)) == libraries(sbom_of(registry, first))
    assert libraries(sbom_of(registry, second)) == [("numpy", "2.0")]
    assert f"those of {first[:19]}'s SBOM" in log[-1]


def test_without_the_earlier_images_sbom_the_layers_are_read(tmp_path):
    registry = OciRegistry()
    digest = push_image(registry, IMAGE_FILES)
    missing = "sha256:" + "99" * 32
    log: list[str] = []
    attach(
        chain_for(registry, None, tmp_path),
        digest,
        contents=KnownContents(model_layer=None, packages_of=missing),
        log=log,
    )
    assert f"the SBOM of {missing} cannot be reused (it has none)" in log[0]
    assert libraries(sbom_of(registry, digest)) == [("numpy", "2.0")]
    assert "read from the image's layers" in log[-1]
