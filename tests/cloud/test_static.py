"""Tests for mlflow_dock.cloud.static: the configured password, as given."""

from __future__ import annotations

from mlflow_dock.cloud.credentials import Credentials
from mlflow_dock.cloud.static import StaticCredentials


def test_a_refused_password_is_not_refetched() -> None:
    provider = StaticCredentials(username="alice", password="s3cret")
    assert provider.refreshable is False
    provider.invalidate()
    assert provider.get() == Credentials(username="alice", password="s3cret")
