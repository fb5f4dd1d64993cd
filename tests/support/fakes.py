"""Small fakes several unit-test modules share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_dock.cloud.credentials import Credentials
from mlflow_dock.imaging.builder import BuildRequest
from mlflow_dock.imaging.dockerfile import ImageSpec
from mlflow_dock.imaging.engine import PushResult
from mlflow_dock.mlflow.client import ModelPackage
from mlflow_dock.oci.manifest import OCI_CONFIG, OCI_MANIFEST
from mlflow_dock.oci.reference import ImageRef
from support.registry import OciRegistry

REGISTRY = "127.0.0.1:5000"
DIGEST_1 = "sha256:" + "1" * 64
DIGEST_2 = "sha256:" + "2" * 64


class RotatingCredentials:
    """A cloud-style provider (ECR, Artifact Registry): a new token after every invalidate()."""

    refreshable = True

    def __init__(self) -> None:
        self.invalidated = 0

    def get(self) -> Credentials:
        return Credentials(username="AWS", password=f"token-{self.invalidated}")

    def invalidate(self) -> None:
        self.invalidated += 1


@dataclass
class FakeEngine:
    """A Docker Engine that builds nothing; with a ``registry``, its pushes land there.

    A pushed image is a manifest with a config blob naming the local reference (so each image
    has its own digest) and no layers, as far as the registry is concerned.
    """

    registry: OciRegistry | None = None
    images: set[str] = field(default_factory=set)
    builds: list[tuple[str, dict[str, str], str]] = field(default_factory=list)
    pushes: list[tuple[str, str]] = field(default_factory=list)
    pulls: list[tuple[str, str]] = field(default_factory=list)
    push_errors: list[Exception] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # repository:tag -> built reference

    def image_exists(self, reference: str) -> bool:
        return reference in self.images

    def ping(self) -> None:
        return None

    def build(self, context: Path, *, extra_files, tag, labels, log, timeout) -> None:  # type: ignore[no-untyped-def]
        self.builds.append((tag, dict(labels), (context / "Dockerfile").read_text()))
        self.images.add(tag)

    def tag(self, source: str, repository: str, tag: str) -> None:
        self.names[f"{repository}:{tag}"] = source
        self.images.add(f"{repository}:{tag}")

    def push(self, repository: str, tag: str, *, username, password, log) -> PushResult:  # type: ignore[no-untyped-def]
        if self.push_errors:
            raise self.push_errors.pop(0)
        self.pushes.append((repository, tag))
        if self.registry is None:
            return PushResult(reference=f"{repository}:{tag}", digest=DIGEST_1)
        path = repository.split("/", 1)[1]
        built = self.names.get(f"{repository}:{tag}", f"{repository}:{tag}")
        config = json.dumps({"built": built, "push": len(self.pushes)}).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": self.registry.put_blob(path, config),
                "size": len(config),
            },
            "layers": [],
        }
        digest = self.registry.put_manifest(path, json.dumps(manifest).encode(), OCI_MANIFEST, tag)
        return PushResult(reference=f"{repository}:{tag}", digest=digest)

    def pull(self, repository: str, reference: str, *, username, password) -> None:  # type: ignore[no-untyped-def]
        self.pulls.append((repository, reference))


def build_request(tmp_path: Path, log: list[str]) -> BuildRequest:
    """A request for version 1 of model "m" to registry.test/team/m, runtime key "key"."""
    return BuildRequest(
        model_name="m",
        version="1",
        target=ImageRef("registry.test/team/m"),
        tag="1",
        package=ModelPackage(tmp_path, "3.11", "x\n", has_serving_example=False),
        spec=ImageSpec(base_image="base", requirements="x\n"),
        build_files={},
        runtime_key="key",
        labels={},
        example=None,
        work=tmp_path,
        log=log.append,
    )
