"""Build log lines as rows: appended by a worker, the newest few read back in order."""

from __future__ import annotations


def test_the_tail_is_the_newest_lines_oldest_first(store):
    store.append_log_lines("j1", ["one", "two"])
    store.append_log_lines("j2", ["other job"])
    store.append_log_lines("j1", ["three"])
    assert store.log_tail("j1", 2) == ["two", "three"]
    assert store.log_tail("j1", 50) == ["one", "two", "three"]
    assert store.log_tail("nobody", 5) == []
