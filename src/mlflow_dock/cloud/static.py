"""The configured username and password (DOCKER_USERNAME / DOCKER_REGISTRY_PASSWORD)."""

from __future__ import annotations

from mlflow_dock.cloud.credentials import Credentials

__all__ = ["StaticCredentials"]


class StaticCredentials:
    """The username and password exactly as configured."""

    # Nothing to refetch: a rejected static password stays rejected.
    refreshable = False

    def __init__(self, *, username: str, password: str) -> None:
        self._credentials = Credentials(username=username, password=password)

    def get(self) -> Credentials:
        return self._credentials

    def invalidate(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"StaticCredentials(username={self._credentials.username!r})"
