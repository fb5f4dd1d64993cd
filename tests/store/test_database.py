"""The shared database object: an unreachable database is a transient fault."""

from __future__ import annotations

import pytest

from mlflow_dock.store.database import store_unavailable
from mlflow_dock.store.facade import JobStore


def test_an_unreachable_database_is_recognised_as_transient():
    from support.servers import free_port

    with pytest.raises(Exception) as raised:
        JobStore.from_url(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    assert store_unavailable(raised.value)
    assert not store_unavailable(ValueError("a bug"))
