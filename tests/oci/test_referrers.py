"""Tests for mlflow_dock.oci.referrers: OCI 1.1 artifact manifests, fallback tags, the index."""

from __future__ import annotations

import hashlib
import json

import pytest

from mlflow_dock.oci.manifest import OCI_INDEX, OCI_MANIFEST, Manifest
from mlflow_dock.oci.referrers import (
    EMPTY_CONFIG,
    EMPTY_MEDIA_TYPE,
    Artifact,
    Descriptor,
    ReferrersError,
    artifact_manifest,
    cosign_tag,
    descriptor_of,
    fallback_tag,
    merge_referrers_index,
    parse_descriptor,
    referrers_of,
)

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"
SUBJECT = Descriptor(OCI_MANIFEST, DIGEST, 1234)
SBOM = Artifact(
    artifact_type="application/vnd.cyclonedx+json",
    media_type="application/vnd.cyclonedx+json",
    data=b'{"bomFormat":"CycloneDX"}',
    annotations={"dev.mlflow-dock.artifact": "sbom"},
)


def test_fallback_tag_follows_the_referrers_tag_schema():
    assert fallback_tag(DIGEST) == f"sha256-{HEX}"


@pytest.mark.parametrize("suffix", ["sig", "att", "sbom"])
def test_cosign_tags(suffix):
    assert cosign_tag(DIGEST, suffix) == f"sha256-{HEX}.{suffix}"


@pytest.mark.parametrize(
    "bad", ["sha256:abc", "sha512:" + "a" * 128, HEX, "sha256:" + "A" * 64, ""]
)
def test_fallback_tag_refuses_what_is_not_a_sha256_digest(bad):
    with pytest.raises(ReferrersError):
        fallback_tag(bad)


def test_cosign_tag_refuses_unknown_suffix():
    with pytest.raises(ReferrersError):
        cosign_tag(DIGEST, "sbomx")


def test_artifact_manifest_has_subject_artifact_type_and_the_empty_config():
    manifest = artifact_manifest(SBOM, subject=SUBJECT)
    doc = json.loads(manifest.body)
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.digest == "sha256:" + hashlib.sha256(manifest.body).hexdigest()
    assert doc["mediaType"] == OCI_MANIFEST
    assert doc["artifactType"] == "application/vnd.cyclonedx+json"
    assert doc["config"] == {
        "mediaType": EMPTY_MEDIA_TYPE,
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "size": 2,
    }
    assert EMPTY_CONFIG == b"{}"
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": DIGEST, "size": 1234}
    assert doc["layers"] == [
        {
            "mediaType": "application/vnd.cyclonedx+json",
            "digest": SBOM.digest,
            "size": len(SBOM.data),
        }
    ]
    assert doc["annotations"] == {"dev.mlflow-dock.artifact": "sbom"}


def test_artifact_manifest_is_deterministic():
    assert artifact_manifest(SBOM, subject=SUBJECT) == artifact_manifest(SBOM, subject=SUBJECT)


def test_artifact_manifest_with_several_layers_keeps_their_annotations():
    one = Artifact("t", "m", b"1", layer_annotations={"sig": "a"})
    two = Artifact("t", "m", b"2", layer_annotations={"sig": "b"})
    doc = json.loads(artifact_manifest([one, two], subject=SUBJECT).body)
    assert [layer["annotations"] for layer in doc["layers"]] == [{"sig": "a"}, {"sig": "b"}]


def test_artifact_manifest_needs_a_layer():
    with pytest.raises(ReferrersError):
        artifact_manifest([], subject=SUBJECT)


def test_artifact_manifest_refuses_mixed_types():
    with pytest.raises(ReferrersError):
        artifact_manifest([SBOM, Artifact("other", "m", b"x")], subject=SUBJECT)


def test_descriptor_of_copies_artifact_type_and_annotations():
    manifest = artifact_manifest(SBOM, subject=SUBJECT)
    descriptor = descriptor_of(manifest)
    assert descriptor == Descriptor(
        OCI_MANIFEST,
        manifest.digest,
        len(manifest.body),
        "application/vnd.cyclonedx+json",
        {"dev.mlflow-dock.artifact": "sbom"},
    )


def test_descriptor_of_uses_the_config_media_type_without_artifact_type():
    body = json.dumps({"config": {"mediaType": "application/x-config"}}).encode()
    assert descriptor_of(Manifest.from_bytes(body, OCI_MANIFEST)).artifact_type == (
        "application/x-config"
    )


@pytest.mark.parametrize("body", [b"not json", b"[1]"])
def test_descriptor_of_refuses_non_objects(body):
    with pytest.raises(ReferrersError):
        descriptor_of(Manifest.from_bytes(body, OCI_MANIFEST))


def test_merge_into_nothing_makes_an_oci_index():
    added = descriptor_of(artifact_manifest(SBOM, subject=SUBJECT))
    index = merge_referrers_index(None, [added])
    assert index.media_type == OCI_INDEX
    doc = json.loads(index.body)
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    assert referrers_of(index.body) == [added]


def test_merge_keeps_foreign_entries_lists_each_digest_once_and_replaces_ours():
    foreign = Descriptor(OCI_MANIFEST, "sha256:" + "1" * 64, 10, "application/spdx+json")
    old_ours = Descriptor(
        OCI_MANIFEST, "sha256:" + "2" * 64, 11, "x", {"dev.mlflow-dock.artifact": "sbom"}
    )
    existing = merge_referrers_index(None, [foreign, old_ours]).body
    new = descriptor_of(artifact_manifest(SBOM, subject=SUBJECT))
    merged = merge_referrers_index(
        existing, [new, new], replaces=[("dev.mlflow-dock.artifact", "sbom")]
    )
    digests = [d.digest for d in referrers_of(merged.body)]
    assert digests == [foreign.digest, new.digest]


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        json.dumps({"mediaType": OCI_MANIFEST, "manifests": []}).encode(),
        json.dumps({"manifests": {}}).encode(),
        json.dumps({"manifests": [{"mediaType": "m", "digest": "d"}]}).encode(),
    ],
)
def test_referrers_of_refuses_malformed_indexes(body):
    with pytest.raises(ReferrersError):
        referrers_of(body)


@pytest.mark.parametrize(
    "value",
    [
        "x",
        {"digest": "d", "size": 1},
        {"mediaType": "m", "digest": "d", "size": -1},
        {"mediaType": "m", "digest": "d", "size": True},
        {"mediaType": "m", "digest": "d", "size": 1, "annotations": []},
    ],
)
def test_parse_descriptor_refuses_malformed_descriptors(value):
    with pytest.raises(ReferrersError):
        parse_descriptor(value)
