"""SBOM, signature and provenance of published images, checked against the real registry.

One service signs with a key in cosign's encrypted format; two versions are registered (the
first built by the engine, the second assembled in the registry on its layers), and an alias is
set. Everything is then found the way cosign and oras do, from the image digest through the
fallback tags of CNCF Distribution 2.8 (no referrers API), and checked with `cryptography`
directly rather than with mlflow-dock's own signing code.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.remote import RegistryClient
from support.cosign import encrypted_key, verify_signature_layer
from support.jobs import alias_of, build_of, job_detail, wait_for_job
from support.servers import log_sklearn_model

pytestmark = pytest.mark.integration

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CYCLONEDX = "application/vnd.cyclonedx+json"
DSSE = "application/vnd.dsse.envelope.v1+json"
VENV_PYTHON = "/opt/mlflow-dock/venv/bin/python"
INSTALLED = (
    "import importlib.metadata as m, json; print(json.dumps("
    "[{'name': d.metadata['Name'], 'version': d.version} for d in m.distributions()]))"
)


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wait_for_tags(mlflow_client, model, version, keys, timeout=60):
    deadline = time.monotonic() + timeout
    tags: dict[str, str] = {}
    while time.monotonic() < deadline:
        tags = mlflow_client.get_model_version(model, version).tags
        if all(key in tags for key in keys):
            return tags
        time.sleep(0.5)
    raise AssertionError(f"tags {keys} never all appeared on {model} v{version}: {tags}")


class Discovered:
    """What a client finds for one image digest, following only the registry's tags."""

    def __init__(self, client: RegistryClient, path: str, digest: str) -> None:
        self.client, self.path, self.digest = client, path, digest
        self.image = client.get_manifest(path, digest)
        hexdigest = digest.removeprefix("sha256:")
        # The OCI 1.1 referrers tag schema: an index tagged sha256-<hex>.
        self.index = client.get_manifest(path, f"sha256-{hexdigest}")
        assert json.loads(self.index.body)["mediaType"] == OCI_INDEX
        self.referrers = json.loads(self.index.body)["manifests"]
        # cosign's own tags.
        self.sig = client.get_manifest(path, f"sha256-{hexdigest}.sig")
        self.att = client.get_manifest(path, f"sha256-{hexdigest}.att")
        self.sbom = client.get_manifest(path, f"sha256-{hexdigest}.sbom")

    def doc(self, manifest) -> dict:
        return json.loads(manifest.body)

    def layer_blob(self, manifest, index: int = 0) -> tuple[dict, bytes]:
        layer = self.doc(manifest)["layers"][index]
        return layer, self.client.get_blob(self.path, layer["digest"])


def check_discoverable(found: Discovered) -> None:
    """Every artifact refers to the image, and the fallback index lists each of them."""
    listed = {d["digest"]: d for d in found.referrers}
    for manifest, artifact_type in (
        (found.sbom, CYCLONEDX),
        (found.sig, "application/vnd.dev.cosign.artifact.sig.v1+json"),
        (found.att, DSSE),
    ):
        doc = found.doc(manifest)
        assert doc["subject"] == {
            "mediaType": found.image.media_type,
            "digest": found.digest,
            "size": len(found.image.body),
        }
        assert doc["artifactType"] == artifact_type
        assert listed[manifest.digest]["artifactType"] == artifact_type
        assert listed[manifest.digest]["size"] == len(manifest.body)


def sbom_packages(found: Discovered) -> dict[str, str]:
    layer, blob = found.layer_blob(found.sbom)
    assert layer["mediaType"] == CYCLONEDX
    bom = json.loads(blob)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] in ("1.5", "1.6")
    assert bom["metadata"]["component"]["version"] == found.digest
    return {canonical(c["name"]): c["version"] for c in bom["components"] if c["type"] == "library"}


def test_published_images_carry_sbom_signature_and_provenance(
    service_factory,
    webhook_factory,
    mlflow_server,
    mlflow_client,
    registry,
    docker_client,
    model_name,
    tmp_path,
):
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / "cosign.key"
    key_path.write_bytes(encrypted_key(key, b"s3cret pass"))
    public = key.public_key()
    service = service_factory(
        MLFLOW_DOCK_BUILD_NETWORK="host",
        # Serving is tested elsewhere; here it would only add a container start per version.
        MLFLOW_DOCK_SMOKE_TEST="false",
        MLFLOW_DOCK_SIGNING_KEY=str(key_path),
        MLFLOW_DOCK_SIGNING_KEY_PASSWORD="s3cret pass",
    )
    webhook_factory(f"{service.url}/webhook", service_factory.secret)

    first = log_sklearn_model(mlflow_server.url, model_name)
    job = wait_for_job(service, build_of(model_name, first))
    assert job["state"] == "succeeded", job
    second = log_sklearn_model(mlflow_server.url, model_name)
    job2 = wait_for_job(service, build_of(model_name, second))
    assert job2["state"] == "succeeded", job2
    mlflow_client.set_registered_model_alias(model_name, "champion", first)
    alias_job = wait_for_job(service, alias_of(model_name, "champion"), timeout=120)
    assert alias_job["state"] == "succeeded", alias_job

    path = naming.repository_name(model_name)
    repository = f"{registry.host}/{path}"
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        found = Discovered(client, path, job["digest"])
        found2 = Discovered(client, path, job2["digest"])
        # The alias tag points at exactly the digest that was signed.
        assert client.manifest_digest(path, "champion") == job["digest"]

        for image in (found, found2):
            check_discoverable(image)
            layer, payload_blob = image.layer_blob(image.sig)
            payload = verify_signature_layer(public, layer, payload_blob)
            critical = payload["critical"]
            assert critical["image"]["docker-manifest-digest"] == image.digest
            assert critical["identity"]["docker-reference"] == repository
            assert critical["type"] == "cosign container image signature"

        # A tampered payload (another image's digest) does not verify.
        layer, payload_blob = found.layer_blob(found.sig)
        tampered = payload_blob.replace(found.digest.encode(), found2.digest.encode())
        assert tampered != payload_blob
        with pytest.raises(InvalidSignature):
            verify_signature_layer(public, layer, tampered)

        # Provenance: a DSSE envelope signed over PAE, about this image, from this event.
        layer, envelope_blob = found.layer_blob(found.att)
        assert layer["mediaType"] == DSSE
        assert layer["annotations"]["predicateType"] == "https://slsa.dev/provenance/v1"
        envelope = json.loads(envelope_blob)
        body = base64.b64decode(envelope["payload"])
        kind = envelope["payloadType"].encode()
        pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)
        public.verify(
            base64.b64decode(envelope["signatures"][0]["sig"]), pae, ec.ECDSA(hashes.SHA256())
        )
        statement = json.loads(body)
        assert statement["subject"][0]["digest"]["sha256"] == found.digest.removeprefix("sha256:")
        external = statement["predicate"]["buildDefinition"]["externalParameters"]
        assert external["model"]["name"] == model_name and external["model"]["version"] == first
        assert external["event"] == "model_version.created" and external["deliveryIds"]
        assert statement["predicate"]["runDetails"]["builder"]["version"]["mlflow-dock"]

        listed = sbom_packages(found)
        # The second version shares the runtime layers, so the same packages.
        assert sbom_packages(found2) == listed

    # The SBOM lists exactly what the image's Python sees installed (a natively built
    # virtualenv has no pip unless a model asks for it, so importlib.metadata, which pip uses).
    published = f"{repository}@{job['digest']}"
    docker_client.images.pull(published, auth_config=registry.auth_config)
    output = docker_client.containers.run(
        published,
        entrypoint=[VENV_PYTHON],
        command=["-c", INSTALLED],
        network_mode="host",
        remove=True,
    )
    reported = {canonical(p["name"]): p["version"] for p in json.loads(output)}
    assert listed == reported

    # References are on the job and written back to MLflow.
    tags = wait_for_tags(
        mlflow_client, model_name, first, ["mlflow_dock.sbom", "mlflow_dock.signature"]
    )
    assert tags["mlflow_dock.sbom"] == f"{repository}@{found.sbom.digest}"
    assert tags["mlflow_dock.signature"] == f"{repository}@{found.sig.digest}"
    for finished in (job, job2):
        log = "\n".join(job_detail(service, finished["id"])["log_tail"])
        assert "attached SBOM" in log, log
        print(next(line for line in log.splitlines() if "attached SBOM" in line))
