from __future__ import annotations

import pytest

from mlflow_dock.jobs.store import JobStore
from support.databases import database


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Every store test runs on both databases the README supports."""
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def store(store_url):
    s = JobStore.from_url(store_url)
    yield s
    s.close()
