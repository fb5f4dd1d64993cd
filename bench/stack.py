"""The stack several benches build on: a local registry holding the test base, an MLflow server,
and `mlflow-dock serve` (native builder) receiving MLflow's webhook.

Everything is stopped when the ``with`` block ends, however it ends.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from support.servers import (
    MlflowServer,
    RegistryServer,
    ServiceProcess,
    ensure_base_image,
    service_environment,
    start_mlflow_server,
    start_registry,
    start_service,
)

BUSYBOX = Path("/bin/busybox")


@dataclass
class Stack:
    registry: RegistryServer
    mlflow_server: MlflowServer
    service: ServiceProcess
    mlflow_client: Any  # mlflow.MlflowClient, imported late: importing mlflow takes seconds


def service_env(
    registry: RegistryServer, mlflow_server: MlflowServer, *, secret: str, data_dir: Path, base: str
) -> dict[str, str]:
    """The service as the V2 bench runs it: native builder, smoke test off, Modelcars on."""
    return service_environment(
        registry,
        mlflow_server,
        secret=secret,
        data_dir=data_dir,
        base_image=base,
        MLFLOW_DOCK_BUILD_NETWORK="host",
        MLFLOW_DOCK_SMOKE_TEST="false",
        MLFLOW_DOCK_MODELCAR="true",
        MLFLOW_DOCK_MODELCAR_BUSYBOX=str(BUSYBOX),
    )


def push_base(client: docker.DockerClient, registry: RegistryServer, base_image: str) -> str:
    """The test base in the registry, as a user's base is in theirs (the native builder reads
    it through the registry API)."""
    repository, tag = f"{registry.host}/mlflow-dock-bench/base", "bookworm-py3.11"
    client.images.get(base_image).tag(repository, tag)
    for chunk in client.api.push(
        repository, tag, stream=True, decode=True, auth_config=registry.auth_config
    ):
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
    return f"{repository}:{tag}"


@contextlib.contextmanager
def webhook_stack(
    client: docker.DockerClient, workdir: Path, *, label: str, **env: str
) -> Iterator[Stack]:
    """Registry, MLflow server and service, with a webhook for new versions; ``env`` overrides
    the service's environment (:func:`service_env`)."""
    registry: RegistryServer | None = None
    mlflow_server: MlflowServer | None = None
    service: ServiceProcess | None = None
    mlflow_client: Any = None
    webhook_id: str | None = None
    try:
        registry = start_registry(workdir / "registry", label, secrets.token_urlsafe(18))
        base = push_base(client, registry, ensure_base_image())
        mlflow_server = start_mlflow_server(workdir / "mlflow")
        secret = secrets.token_urlsafe(32)
        environment = service_env(
            registry, mlflow_server, secret=secret, data_dir=workdir / "data", base=base
        )
        service = start_service({**environment, **env}, workdir / "service")
        from mlflow import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        webhook_id = mlflow_client.create_webhook(
            name=f"{label}-{uuid.uuid4().hex[:8]}",
            url=f"{service.url}/webhook",
            events=["model_version.created"],
            secret=secret,
        ).webhook_id
        time.sleep(1.5)  # the MLflow server caches its webhook list for 1 s
        yield Stack(registry, mlflow_server, service, mlflow_client)
    finally:
        if webhook_id is not None and mlflow_client is not None:
            with contextlib.suppress(Exception):
                mlflow_client.delete_webhook(webhook_id)
        for process in (service, mlflow_server, registry):
            if process is not None:
                with contextlib.suppress(Exception):
                    process.stop()
