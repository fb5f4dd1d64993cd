"""OCI 1.1 artifacts that refer to an image, and the tag names registries without the API use.

Pure: documents in, bytes out. `mlflow_dock.supply.attach` does the registry I/O.

An artifact (SBOM, signature, attestation) is an OCI image manifest with an ``artifactType``,
the empty config, its payload as the one layer, and a ``subject`` naming the image manifest.
Registries with the referrers API (``GET /v2/<name>/referrers/<digest>``) index such manifests
by their subject; on the others (CNCF Distribution 2.x) the OCI 1.1 distribution spec's
tag-schema fallback applies: an image index tagged ``sha256-<hex>`` lists the referrers. cosign
predates both and finds its artifacts under its own tags ``sha256-<hex>.sig`` / ``.att`` /
``.sbom``; the same manifests are tagged there, so cosign, oras and regctl all find them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from mlflow_dock.oci.manifest import OCI_INDEX, OCI_MANIFEST, Manifest

__all__ = [
    "EMPTY_CONFIG",
    "EMPTY_MEDIA_TYPE",
    "Artifact",
    "Descriptor",
    "ReferrersError",
    "artifact_manifest",
    "cosign_tag",
    "descriptor_of",
    "fallback_tag",
    "merge_referrers_index",
    "parse_descriptor",
    "referrers_of",
]

EMPTY_MEDIA_TYPE: Final = "application/vnd.oci.empty.v1+json"
# The spec's empty blob: two bytes "{}", so every artifact shares one config blob.
EMPTY_CONFIG: Final = b"{}"

_DIGEST_RE: Final = re.compile(r"sha256:([0-9a-f]{64})")
_COSIGN_SUFFIXES: Final = frozenset({"sig", "att", "sbom"})


class ReferrersError(ValueError):
    """A document is not what the OCI specs say it must be."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            doc["artifactType"] = self.artifact_type
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc


@dataclass(frozen=True)
class Artifact:
    """A payload to attach: its bytes, layer media type and the manifest's artifactType."""

    artifact_type: str
    media_type: str
    data: bytes
    layer_annotations: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return Manifest.digest_of(self.data)


def _hex(digest: str) -> str:
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ReferrersError(f"not a sha256 digest: {digest!r}")
    return match.group(1)


def fallback_tag(subject_digest: str) -> str:
    """The OCI 1.1 referrers tag schema: ``sha256:<hex>`` -> ``sha256-<hex>``."""
    return f"sha256-{_hex(subject_digest)}"


def cosign_tag(subject_digest: str, suffix: str) -> str:
    """cosign's tag for an image's signatures (sig), attestations (att) or SBOM (sbom)."""
    if suffix not in _COSIGN_SUFFIXES:
        raise ReferrersError(f"unknown cosign tag suffix {suffix!r}")
    return f"{fallback_tag(subject_digest)}.{suffix}"


def descriptor_of(manifest: Manifest, *, artifact_type: str | None = None) -> Descriptor:
    """The descriptor of a manifest, with artifactType and annotations as the spec copies them."""
    try:
        doc = json.loads(manifest.body)
    except ValueError as exc:
        raise ReferrersError(f"manifest {manifest.digest} is not JSON") from exc
    if not isinstance(doc, dict):
        raise ReferrersError(f"manifest {manifest.digest} is not a JSON object")
    annotations = doc.get("annotations") or {}
    declared = doc.get("artifactType")
    if artifact_type is None and isinstance(declared, str):
        artifact_type = declared
    if artifact_type is None:
        config = doc.get("config")
        if isinstance(config, dict) and isinstance(config.get("mediaType"), str):
            # The spec's rule for manifests without artifactType: the config's media type.
            artifact_type = config["mediaType"]
    return Descriptor(
        media_type=manifest.media_type,
        digest=manifest.digest,
        size=len(manifest.body),
        artifact_type=artifact_type,
        annotations={str(k): str(v) for k, v in annotations.items()}
        if isinstance(annotations, dict)
        else {},
    )


def artifact_manifest(artifact: Artifact | Iterable[Artifact], *, subject: Descriptor) -> Manifest:
    """An OCI image manifest carrying one artifact (or several layers of one type).

    Several layers of the same type is how cosign stores more than one signature of an image.
    The config is the empty descriptor, whose blob (``{}``) the caller uploads.
    """
    artifacts = [artifact] if isinstance(artifact, Artifact) else list(artifact)
    if not artifacts:
        raise ReferrersError("an artifact manifest needs at least one layer")
    kinds = {a.artifact_type for a in artifacts}
    if len(kinds) != 1:
        raise ReferrersError(f"one manifest cannot mix artifact types {sorted(kinds)}")
    annotations: dict[str, str] = {}
    for item in artifacts:
        annotations.update(item.annotations)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifacts[0].artifact_type,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": Manifest.digest_of(EMPTY_CONFIG),
            "size": len(EMPTY_CONFIG),
        },
        "layers": [
            Descriptor(
                media_type=item.media_type,
                digest=item.digest,
                size=len(item.data),
                annotations=item.layer_annotations,
            ).to_json()
            for item in artifacts
        ],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
    }
    if annotations:
        doc["annotations"] = annotations
    return Manifest.from_bytes(_encode(doc), OCI_MANIFEST)


def parse_descriptor(value: object) -> Descriptor:
    if not isinstance(value, dict):
        raise ReferrersError("a descriptor must be a JSON object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise ReferrersError("a descriptor needs mediaType and digest strings")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ReferrersError(f"descriptor {digest} has no valid size")
    artifact_type = value.get("artifactType")
    annotations = value.get("annotations")
    if annotations is None:
        annotations = {}
    if not isinstance(annotations, dict):
        raise ReferrersError(f"descriptor {digest} has annotations that are not an object")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def referrers_of(index_body: bytes) -> list[Descriptor]:
    """The descriptors listed by a referrers index (API answer or fallback tag)."""
    try:
        doc = json.loads(index_body)
    except ValueError as exc:
        raise ReferrersError("referrers index is not JSON") from exc
    if not isinstance(doc, dict):
        raise ReferrersError("referrers index is not a JSON object")
    if doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
        raise ReferrersError(f"referrers index has media type {doc.get('mediaType')!r}")
    manifests = doc.get("manifests", [])
    if not isinstance(manifests, list):
        raise ReferrersError("referrers index 'manifests' is not a list")
    return [parse_descriptor(item) for item in manifests]


def merge_referrers_index(
    existing: bytes | None,
    add: Iterable[Descriptor],
    *,
    replaces: Iterable[tuple[str, str]] = (),
) -> Manifest:
    """The fallback tag's new index: ``existing`` plus ``add``, each digest listed once.

    ``replaces`` ((annotation key, value) pairs) drops earlier entries carrying one of them,
    so a retried job replaces its own earlier artifacts instead of piling them up, while other
    tools' referrers stay listed.
    """
    current = referrers_of(existing) if existing is not None else []
    new = list({d.digest: d for d in add}.values())
    new_digests = {d.digest for d in new}
    dropped = set(replaces)
    kept = [
        d
        for d in current
        if d.digest not in new_digests and not dropped.intersection(d.annotations.items())
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [d.to_json() for d in [*kept, *new]],
    }
    return Manifest.from_bytes(_encode(doc), OCI_INDEX)


def _encode(doc: Mapping[str, Any]) -> bytes:
    # Compact, key order as written: the bytes are what gets digested, so keep them stable.
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
