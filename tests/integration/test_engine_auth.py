"""Engine pushes and pulls whose cloud token was refused get one fresh token (real parts).

The registry is the session's Distribution with htpasswd auth; a provider whose first token is
wrong stands in for an ECR/Artifact Registry token that ended early. The image is a one-file
`docker import` (nothing can be pulled here).
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import uuid

import docker
import pytest

from mlflow_dock.cloud.credentials import Credentials
from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.engine import DockerEngine, with_fresh_credentials
from support.servers import RegistryServer


class ExpiringToken:
    """Hands out a refused token until invalidated, then the registry's real password."""

    refreshable = True

    def __init__(self, registry: RegistryServer) -> None:
        self._registry = registry
        self.invalidated = 0

    def get(self) -> Credentials:
        password = self._registry.password if self.invalidated else "expired-token"
        return Credentials(username=self._registry.username, password=password)

    def invalidate(self) -> None:
        self.invalidated += 1


def one_file_image(client: docker.DockerClient, repository: str) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        payload = uuid.uuid4().bytes
        info = tarfile.TarInfo("model.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    client.api.import_image_from_data(data.getvalue(), repository=repository, tag="1")


def test_engine_push_and_pull_refresh_a_refused_token(
    registry: RegistryServer, docker_client: docker.DockerClient
) -> None:
    repository = f"{registry.host}/it-auth/tiny-{uuid.uuid4().hex[:8]}"
    one_file_image(docker_client, repository)
    engine = DockerEngine()
    try:
        pushing = ExpiringToken(registry)
        pushed = with_fresh_credentials(
            pushing,
            lambda c: engine.push(
                repository, "1", username=c.username, password=c.password, log=lambda _l: None
            ),
        )
        assert pushing.invalidated == 1 and pushed.digest.startswith("sha256:")
        docker_client.images.remove(f"{repository}:1", force=True, noprune=True)

        pulling = ExpiringToken(registry)
        with_fresh_credentials(
            pulling,
            lambda c: engine.pull(
                repository, pushed.digest, username=c.username, password=c.password
            ),
        )
        assert pulling.invalidated == 1
        assert engine.image_exists(f"{repository}@{pushed.digest}")

        # Refused again after the refresh: a permanent failure, not a loop.
        never = ExpiringToken(registry)
        never.get = lambda: Credentials(username="nobody", password="wrong")  # type: ignore[method-assign]
        with pytest.raises(PermanentError):
            with_fresh_credentials(
                never,
                lambda c: engine.pull(repository, "1", username=c.username, password=c.password),
            )
        assert never.invalidated == 1
    finally:
        # The pulled image is known by digest only; the imported one by its tag.
        for image in docker_client.images.list(name=repository):
            with contextlib.suppress(docker.errors.APIError):
                docker_client.images.remove(image.id, force=True, noprune=True)
        engine.close()
