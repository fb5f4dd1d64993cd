"""Named leases: one holder until the lease expires."""

from __future__ import annotations

import time


def test_named_lease_has_one_holder_until_it_expires(store):
    assert store.try_lock("leader", owner="a", lease_seconds=1.0)
    assert not store.try_lock("leader", owner="b", lease_seconds=1.0)
    assert store.try_lock("leader", owner="a", lease_seconds=1.0)  # renewal
    assert store.lock_owner("leader") == "a"
    time.sleep(1.1)
    assert store.try_lock("leader", owner="b", lease_seconds=1.0)
    store.release_lock("leader", owner="a")  # not a's any more: no effect
    assert store.lock_owner("leader") == "b"
    store.release_lock("leader", owner="b")
    assert store.try_lock("leader", owner="a", lease_seconds=0.3)
