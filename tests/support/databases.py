"""Job store databases for tests: SQLite files and throwaway PostgreSQL schemas.

PostgreSQL comes from `MLFLOW_DOCK_TEST_POSTGRES_URL` (set by `.ci/run`); each store gets its own
schema, dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

POSTGRES_ENV = "MLFLOW_DOCK_TEST_POSTGRES_URL"


def postgres_url() -> str:
    """The test server's URL; skips (or, under CI, fails) when it is not configured."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        reason = f"{POSTGRES_ENV} is not set (bash .ci/run starts PostgreSQL and sets it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return url


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A database URL whose connections use a fresh, empty schema."""
    from sqlalchemy import create_engine, text

    base = postgres_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh store URL of `kind` ("sqlite" or "postgresql")."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        with postgres_schema() as url:
            yield url
