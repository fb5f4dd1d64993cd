"""Staging a candidate in the target repository and publishing it under its version tag.

Two rules live here and nowhere else:

- **What is signed is what was checked.** Every candidate is stored in the target repository by
  digest before any tag names it (an engine-built one through the service's own staging
  repository, whose blobs are mounted across), so the SBOM, signature and provenance are
  attached to that digest first: a policy controller that sees the tag also sees the signature.
- **A version tag never moves.** Users pin version tags, and a job re-run after a lost lease
  (whose first run may have published, then lost the store) must not replace the image they
  pulled. The tag's current digest is read right before it is written: if it already names
  another image, that image stays and is the outcome, with a note saying so. OCI has no
  conditional PUT, so two publishers racing within one round trip can still both write; leases
  make that a worker that lost its lease and keeps going, whose outcome the store then refuses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, cast

from mlflow_dock.imaging import assembly
from mlflow_dock.imaging.builder import BuildRequest, Candidate, LocalImage, StagedImage
from mlflow_dock.imaging.engine import EngineTransfers
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.oci.remote import RegistryClient

__all__ = ["STAGING_REPOSITORY", "Published", "Publisher"]

RegistryFactory = Callable[[str], RegistryClient]

# The service's own repository an engine pushes a candidate to before it is staged by digest
# in the target (a reserved name: no model maps onto it, see oci/reference.py).
STAGING_REPOSITORY = "mlflow-dock-staging"


@dataclass(frozen=True)
class Published:
    reference: str  # repository:tag
    digest: str  # what the tag names now
    note: str | None = None  # e.g. the tag named another image already and was kept


class Publisher:
    def __init__(
        self,
        *,
        registry_factory: RegistryFactory,
        engine: EngineTransfers,
        staging: ImageRef,
        prepare_repository: Callable[[ImageRef], None] = lambda _repository: None,
    ) -> None:
        self._registry_factory = registry_factory
        # Only engine-built candidates go through it; the engine-free path never does.
        self._engine = engine
        self._staging = staging
        self._prepare_repository = prepare_repository

    def stage(self, candidate: Candidate, request: BuildRequest) -> StagedImage:
        """The candidate stored in the target repository by digest, untagged."""
        if isinstance(candidate, StagedImage):
            return candidate
        return self._stage_local(candidate, request)

    def publish(self, staged: StagedImage, request: BuildRequest) -> Published:
        target, tag = request.target, request.tag
        with self._registry_factory(target.host) as registry:
            done = assembly.publish_manifest(registry, target.path, tag, staged.manifest)
        if done.note:
            request.log(done.note)
        return Published(str(target.with_tag(tag)), done.digest, done.note)

    def _stage_local(self, candidate: LocalImage, request: BuildRequest) -> StagedImage:
        # An engine pushes by tag only: to a tag of the staging repository, unique per version,
        # never to the target, where a tag is what users see.
        staging = self._staging
        stage_tag = (
            "stage-"
            + hashlib.sha256(f"{request.target.repository}\0{request.tag}".encode()).hexdigest()[
                :40
            ]
        )
        self._prepare_repository(staging)
        self._engine.engine.tag(candidate.reference, staging.repository, stage_tag)
        pushed = self._engine.push(staging.repository, stage_tag, request.log)
        target = request.target
        with self._registry_factory(target.host) as registry:
            manifest = registry.get_manifest(staging.path, pushed.digest)
            document = json.loads(manifest.body)
            blobs = [document["config"], *document.get("layers", [])]
            for blob in blobs:
                digest = str(blob["digest"])
                if registry.blob_exists(target.path, digest) or registry.mount_blob(
                    target.path, digest, staging.path
                ):
                    continue
                # A registry that does not mount: through this worker (blobs of a new runtime),
                # streamed, never held in memory.
                with registry.open_blob(staging.path, digest, int(blob["size"])) as stream:
                    registry.upload_blob(target.path, cast(IO[bytes], stream), digest)
            registry.put_manifest_by_digest(target.path, manifest)
        request.log(f"staged {target.repository}@{manifest.digest} (engine build)")
        return StagedImage(manifest, speaks_v2=candidate.speaks_v2)
