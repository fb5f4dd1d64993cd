"""Small fakes several unit-test modules share."""

from __future__ import annotations

from mlflow_dock.cloud.credentials import Credentials


class RotatingCredentials:
    """A cloud-style provider (ECR, Artifact Registry): a new token after every invalidate()."""

    def __init__(self) -> None:
        self.invalidated = 0

    def get(self) -> Credentials:
        return Credentials(username="AWS", password=f"token-{self.invalidated}")

    def invalidate(self) -> None:
        self.invalidated += 1
