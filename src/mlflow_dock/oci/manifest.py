"""Manifests as bytes and the media types of OCI and Docker images (pure: no I/O).

A manifest's digest is the sha256 of its exact bytes, so a `Manifest` never re-encodes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_LAYER_TAR",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_TAR",
    "OCI_MANIFEST",
    "Manifest",
    "digest_matches",
]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES: Final = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
# An uncompressed layer: its digest is its diff_id (models' weight files, which do not compress).
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_TAR: Final = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"


def _hexdigest(algorithm: str, body: bytes) -> str | None:
    try:
        return hashlib.new(algorithm, body).hexdigest()
    except (ValueError, TypeError):
        return None


def digest_matches(body: bytes, digest: str) -> bool | None:
    """Whether ``digest`` is the digest of ``body``; None if its algorithm is unknown to us."""
    algorithm, _, expected = digest.partition(":")
    actual = _hexdigest(algorithm, body) if algorithm in {"sha256", "sha384", "sha512"} else None
    if actual is None:
        return None
    return actual == expected.lower()


@dataclass(frozen=True)
class Manifest:
    """A manifest exactly as the registry served it; ``body`` is never re-encoded."""

    body: bytes
    media_type: str
    digest: str

    def __post_init__(self) -> None:
        # A Manifest whose digest lies about its body would make put_manifest's check against
        # the registry's Docker-Content-Digest fail in a confusing way; refuse it up front.
        if self.digest != Manifest.digest_of(self.body):
            raise ValueError("Manifest.digest is not the sha256 digest of Manifest.body")

    @staticmethod
    def digest_of(body: bytes) -> str:
        return "sha256:" + hashlib.sha256(body).hexdigest()

    @classmethod
    def from_bytes(cls, body: bytes, media_type: str) -> Manifest:
        return cls(body=body, media_type=media_type, digest=cls.digest_of(body))
