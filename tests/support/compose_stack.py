"""Running the repository's compose.yaml for real, on a machine that cannot pull images.

compose.yaml names the public images a user's machine pulls (postgres:16, redis:7,
registry:2) and builds the other two (MLflow from deploy/compose/mlflow.Dockerfile, the
service from the repository's Dockerfile). Here nothing can be pulled, so every image is built
locally from the offline test base, and a generated override file swaps each service's
`image:` (and, for the Debian stand-ins, the command) without touching compose.yaml:

- ``debian-services``: Debian's postgresql, redis-server and docker-registry in one image
  (tests/support/compose/standins.Dockerfile), used by three services;
- ``mlflow``: deploy/compose/mlflow.Dockerfile itself, on the test base;
- ``service``: the repository's Dockerfile, on the test base.

Images are tagged by a hash of their inputs and reused while the tag exists, so only the
first run on a machine (or a change of inputs) pays for the builds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import httpx
import yaml
from docker.models.containers import Container

from support import web
from support.servers import REPO_ROOT, SYSTEM_CA_BUNDLE, free_port
from support.service_image import (
    CONTEXT_FILES,
    add_build_inputs,
    build_image,
    service_build_context,
)

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
STANDIN_DIR = Path(__file__).resolve().parent / "compose"
MLFLOW_DOCKERFILE = REPO_ROOT / "deploy" / "compose" / "mlflow.Dockerfile"
IMAGE_PREFIX = "mlflow-dock-compose-standin"
# Where the worker finds the test machine's CA bundle (pip and uv reach PyPI only with it).
CA_IN_CONTAINER = "/etc/mlflow-dock-test/ca-bundle.crt"
# Where the test puts its base image in the stack's registry, for the native builder.
BASE_REPOSITORY = "mlflow-dock-test/base"
BASE_TAG = "bookworm-py3.11"
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# Variables compose.yaml interpolates; the caller's environment must not override the test's.
STACK_VARIABLES = (
    "MLFLOW_WEBHOOK_SECRET",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
    "POSTGRES_PASSWORD",
    "MLFLOW_DOCK_API_TOKEN",
    "DOCKER_GID",
    "DOCKER_USERNAME",
    "DOCKER_REGISTRY_PASSWORD",
    "MLFLOW_DOCK_LOG_LEVEL",
    "MLFLOW_DOCK_BUILD_CONCURRENCY",
    "MLFLOW_DOCK_BUILDER",
    "POSTGRES_PORT",
    "REDIS_PORT",
    "REGISTRY_PORT",
    "MLFLOW_PORT",
    "SERVE_PORT",
    "MLFLOW_WORKERS",
)


def compose_command() -> list[str] | None:
    """docker-compose (Debian's 1.29, what .ci/run installs) or the v2 plugin, if present."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


# --------------------------------------------------------------------------- images


def _digest(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _files(root: Path, names: Iterable[str]) -> list[bytes]:
    return [name.encode() + b"\0" + (root / name).read_bytes() for name in names]


def _source_tree(root: Path) -> list[bytes]:
    return [
        str(path.relative_to(root)).encode() + b"\0" + path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]


@dataclass(frozen=True)
class StandinImages:
    services: str  # postgres, redis and the registry
    mlflow: str
    service: str  # mlflow-dock serve and worker


def _exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _drop_other_tags(client: docker.DockerClient, repository: str, keep: str) -> None:
    """Earlier builds of the same stand-in: their inputs changed, they are never used again."""
    for image in client.images.list(name=repository):
        for tag in image.tags:
            if tag.startswith(repository + ":") and tag != keep:
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(tag, noprune=True)


def _ensure(repository: str, key: str, build: Callable[[docker.DockerClient, str], None]) -> str:
    tag = f"{IMAGE_PREFIX}/{repository}:{key}"
    client = docker.from_env(timeout=900)
    try:
        if not _exists(client, tag):
            build(client, tag)
            _drop_other_tags(client, f"{IMAGE_PREFIX}/{repository}", tag)
    finally:
        client.close()
    return tag


def ensure_standin_images(base_image: str, workdir: Path) -> StandinImages:
    """Build (or reuse by tag) the three images the stack runs here; builds run in parallel."""
    probe = docker.from_env()
    try:
        base_id = probe.images.get(base_image).id.encode()
    finally:
        probe.close()
    args = {"BASE_IMAGE": base_image}

    standin_files = sorted(p.name for p in STANDIN_DIR.iterdir() if p.is_file())
    services_key = _digest([base_id, *_files(STANDIN_DIR, standin_files)])

    def build_services(client: docker.DockerClient, tag: str) -> None:
        build_image(client, STANDIN_DIR, tag, dockerfile="standins.Dockerfile", buildargs=args)

    mlflow_key = _digest([base_id, MLFLOW_DOCKERFILE.read_bytes()])

    def build_mlflow(client: docker.DockerClient, tag: str) -> None:
        context = workdir / "mlflow-context"
        context.mkdir()
        shutil.copy2(MLFLOW_DOCKERFILE, context / MLFLOW_DOCKERFILE.name)
        add_build_inputs(context)
        build_image(client, context, tag, dockerfile=MLFLOW_DOCKERFILE.name, buildargs=args)

    service_key = _digest(
        [base_id, *_files(REPO_ROOT, CONTEXT_FILES), *_source_tree(REPO_ROOT / "src")]
    )

    def build_service(client: docker.DockerClient, tag: str) -> None:
        context = workdir / "service-context"
        context.mkdir()
        service_build_context(context)
        build_image(client, context, tag, buildargs={**args, "VERSION": "0.0.0-compose-test"})

    with ThreadPoolExecutor(max_workers=3) as pool:
        services = pool.submit(_ensure, "debian-services", services_key, build_services)
        mlflow = pool.submit(_ensure, "mlflow", mlflow_key, build_mlflow)
        service = pool.submit(_ensure, "service", service_key, build_service)
        return StandinImages(services.result(), mlflow.result(), service.result())


# --------------------------------------------------------------------------- the stack


def _override(images: StandinImages, registry_port: int) -> dict[str, object]:
    worker_env = {
        **QUIET_ENV,
        # The base the native builder reads through the registry API: the test base, pushed
        # into the stack's own registry by the test (a user's base is in a registry already).
        "MLFLOW_DOCK_BASE_IMAGE": f"127.0.0.1:{registry_port}/{BASE_REPOSITORY}:{BASE_TAG}",
    }
    worker: dict[str, object] = {"image": images.service, "environment": worker_env}
    if SYSTEM_CA_BUNDLE.exists():
        worker_env["MLFLOW_DOCK_BUILD_CA_BUNDLE"] = CA_IN_CONTAINER
        worker["volumes"] = [f"{SYSTEM_CA_BUNDLE}:{CA_IN_CONTAINER}:ro"]
    return {
        "services": {
            "postgres": {
                "image": images.services,
                "user": "postgres",
                "command": ["postgres-entrypoint"],
                # The postgres image's STOPSIGNAL: a fast shutdown, not one that waits for
                # every client to disconnect.
                "stop_signal": "SIGINT",
            },
            "redis": {
                "image": images.services,
                "user": "redis",
                # What the redis image's entrypoint adds: data in /data, remote clients allowed.
                "command": [
                    "redis-server",
                    "--appendonly",
                    "yes",
                    "--dir",
                    "/data",
                    "--protected-mode",
                    "no",
                ],
            },
            "registry": {
                "image": images.services,
                "command": ["docker-registry", "serve", "/etc/docker/registry/standin.yml"],
            },
            "mlflow": {
                "image": images.mlflow,
                "environment": {
                    **QUIET_ENV,
                    # Webhooks created by the test fire for its very next event (default 60 s).
                    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
                    # GenAI job runners: most of 2 CPU cores at startup, unused here.
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                },
            },
            "serve": {"image": images.service, "environment": dict(QUIET_ENV)},
            "worker": worker,
        }
    }


@dataclass
class ComposeStack:
    """One compose project from compose.yaml + the stand-in override, on free loopback ports."""

    command: list[str]
    workdir: Path
    images: StandinImages
    project: str = field(default_factory=lambda: f"mlflowdocktest{uuid.uuid4().hex[:8]}")
    webhook_secret: str = field(default_factory=lambda: uuid.uuid4().hex)
    ports: dict[str, int] = field(
        default_factory=lambda: {
            name: free_port()
            for name in (
                "POSTGRES_PORT",
                "REDIS_PORT",
                "REGISTRY_PORT",
                "MLFLOW_PORT",
                "SERVE_PORT",
            )
        }
    )

    def __post_init__(self) -> None:
        self.env_file = self.workdir / "compose.env"
        variables = {
            "MLFLOW_WEBHOOK_SECRET": self.webhook_secret,
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(
                os.urandom(32)
            ).decode(),
            "POSTGRES_PASSWORD": uuid.uuid4().hex,
            **{name: str(port) for name, port in self.ports.items()},
            # One MLflow server process: a 2-CPU CI machine runs the whole stack and the test.
            "MLFLOW_WORKERS": "1",
        }
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
        self.override_file = self.workdir / "compose.standins.yaml"
        self.override_file.write_text(
            yaml.safe_dump(_override(self.images, self.ports["REGISTRY_PORT"]), sort_keys=False)
        )

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['MLFLOW_PORT']}"

    @property
    def url(self) -> str:
        """mlflow-dock serve (what support.jobs' helpers call `service.url`)."""
        return f"http://127.0.0.1:{self.ports['SERVE_PORT']}"

    @property
    def registry_host(self) -> str:
        return f"127.0.0.1:{self.ports['REGISTRY_PORT']}"

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
        argv = [
            *self.command,
            "--project-name",
            self.project,
            "--env-file",
            str(self.env_file),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(self.override_file),
            *args,
        ]
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def up(self) -> None:
        result = self.compose("up", "-d", "--no-build")
        if result.returncode != 0:
            raise RuntimeError(f"compose up failed:\n{result.stderr[-4000:]}\n{self.logs()}")

    def logs(self, tail: int = 60) -> str:
        result = self.compose("logs", "--no-color", f"--tail={tail}", timeout=60)
        return result.stdout[-20000:] + result.stderr[-2000:]

    def down(self) -> None:
        # Killed first: a graceful stop (Celery's warm shutdown, MLflow's workers) proves
        # nothing here and costs half a minute.
        self.compose("kill", timeout=60)
        result = self.compose("down", "-v", "--remove-orphans", "--timeout", "5")
        if result.returncode != 0:
            print(f"compose down failed:\n{result.stderr[-4000:]}")

    def containers(self, client: docker.DockerClient) -> list[Container]:
        return client.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={self.project}"}
        )

    def wait_until_answering(self, timeout: float = 180.0) -> None:
        """MLflow (migrations done), the registry and serve's /ready all answer 200."""
        deadline = time.monotonic() + timeout
        for url in (
            f"{self.mlflow_url}/health",
            f"http://{self.registry_host}/v2/",
            f"{self.url}/ready",
        ):
            self.wait_for(url, deadline - time.monotonic())

    def wait_for(self, url: str, timeout: float = 180.0) -> None:
        """Until ``url`` answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if web.get(url, timeout=5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not answering after {timeout:.0f}s\n{self.logs()}")
            time.sleep(1)
