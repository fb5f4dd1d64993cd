"""Tests for mlflow_dock.cloud.credentials: what every provider hands out.

The providers have their own modules (test_static, test_ecr, test_google); choosing one from the
settings is test_providers.
"""

from __future__ import annotations

from mlflow_dock.cloud.credentials import Credentials
from mlflow_dock.cloud.static import StaticCredentials
from support.cloud import MARKER


def test_credentials_repr_hides_password() -> None:
    creds = Credentials(username="alice", password=MARKER)
    for text in (repr(creds), str(creds), f"{creds}", f"{creds!r}"):
        assert MARKER not in text
        assert "alice" in text
    assert creds.auth_config() == {"username": "alice", "password": MARKER}
    provider = StaticCredentials(username="alice", password=MARKER)
    assert MARKER not in repr(provider)
