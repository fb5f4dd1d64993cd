"""Suite-wide pytest configuration. Kept light: unit tests must not pay for Docker or MLflow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
INTEGRATION_DIR = TESTS_DIR / "integration"

# `import support.servers` must work under any --import-mode, not only pytest's default
# "prepend" (which would put this directory on sys.path by itself).
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from support.collection import OFFERED_KEY  # noqa: E402

# For tests/test_collection.py, which runs pytest itself on generated modules.
pytest_plugins = ["pytester"]


def pytest_configure(config: pytest.Config) -> None:
    config.stash[OFFERED_KEY] = set()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> None:
    if file_path.name.startswith("test_") and file_path.suffix == ".py":
        parent.config.stash[OFFERED_KEY].add(file_path.resolve())


# Started first (pytest-xdist hands tests out in collection order): the longest tests, so that
# none of them begins when the rest of the suite is already done. A scheduling hint measured on
# CI's 2 cores (see docs/testing.md); a stale entry only costs wall time.
STARTED_FIRST = (
    "integration/test_build_secrets.py",
    "integration/test_confinement.py",
    "integration/test_open_inference.py",
    "integration/test_faults.py",
    "integration/test_distributed.py",
    "integration/test_native_builder.py",
    "integration/test_end_to_end.py",
    "integration/test_compose_stack.py",
    "integration/test_rabbitmq.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # `-n auto` (pyproject's addopts): integration tests mostly wait (MLflow, the registry,
    # containers starting, a registry frozen for 90 s), so four workers keep CI's two cores
    # busy. MLFLOW_DOCK_TEST_WORKERS overrides; `-n 0` runs everything in this process.
    return int(os.environ.get("MLFLOW_DOCK_TEST_WORKERS", "4"))


def _start_rank(item: pytest.Item) -> int:
    relative = Path(str(item.path)).resolve().relative_to(TESTS_DIR).as_posix()
    for rank, prefix in enumerate(STARTED_FIRST):
        if relative.startswith(prefix):
            return rank
    # Then the other integration tests, then the unit tests, each in collection order.
    return len(STARTED_FIRST) + (0 if relative.startswith("integration/") else 1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs real Docker, a registry and an MLflow server;
    # marking here means nobody can forget the marker, and `-m "not integration"` is reliable.
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
    items.sort(key=_start_rank)  # stable: collection order within a rank


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path):
    """Every store test runs on both databases the README supports."""
    from support.databases import database

    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def store(store_url: str):
    """The whole job store (`store.facade.JobStore`), migrated, on `store_url`."""
    from mlflow_dock.store.facade import JobStore

    s = JobStore.from_url(store_url)
    yield s
    s.close()
