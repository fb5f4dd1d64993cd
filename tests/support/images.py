"""Images written straight through the registry API, for bases an engine cannot load here."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from mlflow_dock.oci.manifest import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, Manifest
from mlflow_dock.oci.remote import RegistryClient


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def push_rootfs(
    client: RegistryClient, rootfs_tar: Path, repository: str, *, architecture: str
) -> Manifest:
    """A one-layer image of ``rootfs_tar`` stored untagged in ``repository``; its manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        layer = Path(tmp) / "layer.tar.gz"
        with (
            rootfs_tar.open("rb") as src,
            gzip.GzipFile(layer, "wb", compresslevel=1, mtime=0) as gz,
        ):
            shutil.copyfileobj(src, gz, 1 << 20)
        diff_id = _sha256_file(rootfs_tar)
        digest = client.upload_blob(repository, layer)
        size = layer.stat().st_size
    config = json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["python3"],
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "debootstrap --foreign + dpkg-deb -x (tests)"}],
        }
    ).encode()
    config_digest = client.upload_blob(repository, config)
    manifest = Manifest.from_bytes(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": digest, "size": size}],
            }
        ).encode(),
        OCI_MANIFEST,
    )
    client.put_manifest_by_digest(repository, manifest)
    return manifest


def copy_image(client: RegistryClient, source: str, reference: str, repository: str) -> Manifest:
    """``source:reference`` (a single image) into ``repository`` by cross-repository mounts."""
    manifest = client.get_manifest(source, reference)
    document = json.loads(manifest.body)
    for blob in [document["config"], *document["layers"]]:
        if not client.mount_blob(repository, blob["digest"], source):
            client.upload_blob(repository, client.get_blob(source, blob["digest"]), blob["digest"])
    client.put_manifest_by_digest(repository, manifest)
    return manifest


def put_index(
    client: RegistryClient, repository: str, tag: str, images: dict[str, Manifest]
) -> Manifest:
    """An OCI index tagged ``tag`` over ``{"amd64": manifest, ...}`` (linux images)."""
    index = Manifest.from_bytes(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": manifest.media_type,
                        "digest": manifest.digest,
                        "size": len(manifest.body),
                        "platform": {"os": "linux", "architecture": architecture},
                    }
                    for architecture, manifest in images.items()
                ],
            }
        ).encode(),
        OCI_INDEX,
    )
    client.put_manifest(repository, tag, index)
    return index
