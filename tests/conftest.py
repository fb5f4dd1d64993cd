"""Suite-wide pytest configuration. Kept light: unit tests must not pay for Docker or MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
INTEGRATION_DIR = TESTS_DIR / "integration"

# `import support.servers` must work under any --import-mode, not only pytest's default
# "prepend" (which would put this directory on sys.path by itself).
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs real Docker, a registry and an MLflow server;
    # marking here means nobody can forget the marker, and `-m "not integration"` is reliable.
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
