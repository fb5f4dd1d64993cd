"""Building the service's own image (repo-root Dockerfile) and other local images for tests.

Shared by the service-image test and the compose test. Builds run with the host network
because the default bridge network does not reach the package index on the test machines.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import docker
import docker.errors
from docker.models.images import Image

from support.servers import REPO_ROOT, SYSTEM_CA_BUNDLE

# What the Dockerfile COPYs; the build context is a copy of just these.
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "README.md")


class ImageBuildError(RuntimeError):
    """A `docker build` failed; the message carries the tail of its log."""


def add_build_inputs(context: Path) -> None:
    """The optional `.build/ca-bundle.crt` the Dockerfiles here read in their builder stage.

    Written only into temporary copies of a context, so it never appears in the working tree.
    """
    if SYSTEM_CA_BUNDLE.exists():
        build_inputs = context / ".build"
        build_inputs.mkdir(exist_ok=True)
        shutil.copy2(SYSTEM_CA_BUNDLE, build_inputs / "ca-bundle.crt")


def service_build_context(target: Path) -> Path:
    """A copy of what the repository's Dockerfile needs, plus the optional build inputs."""
    for name in CONTEXT_FILES:
        shutil.copy2(REPO_ROOT / name, target / name)
    shutil.copytree(
        REPO_ROOT / "src",
        target / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    add_build_inputs(target)
    return target


def build_image(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    *,
    dockerfile: str = "Dockerfile",
    buildargs: Mapping[str, str] | None = None,
) -> Image:
    """``docker build --network host`` of ``context``; ImageBuildError with the log tail."""
    try:
        image, _ = client.images.build(
            path=str(context),
            dockerfile=dockerfile,
            tag=tag,
            buildargs=dict(buildargs or {}),
            network_mode="host",
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as exc:
        tail = "".join(
            str(chunk.get("stream") or chunk.get("error") or "") for chunk in exc.build_log
        )
        raise ImageBuildError(f"building {tag} failed: {exc}\n{tail[-6000:]}") from exc
    return image
