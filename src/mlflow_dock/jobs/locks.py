"""Deployment-wide locks and the leader lease, both on the store's named leases.

`StoreLocks.hold(name)` blocks until this process holds the named lease, renews it in the
background while the caller works, and releases it afterwards; a holder that dies stops
renewing, so its lock frees itself after `lease_seconds`. `LeaderLease` is the same idea kept
for as long as the process lives: one replica runs the singletons (reconciliation, the celery
sweeper, MLflow write-back), and another takes over when its lease expires.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

logger = logging.getLogger(__name__)

LEADER_LOCK = "leader"


class NamedLeases(Protocol):
    """The store's named leases (`store.locks.NamedLocks`)."""

    def try_lock(self, name: str, *, owner: str, lease_seconds: float) -> bool: ...

    def release_lock(self, name: str, *, owner: str) -> None: ...

    def lock_owner(self, name: str) -> str | None: ...


class StoreLocks:
    def __init__(
        self, store: NamedLeases, *, owner: str, lease_seconds: float, poll_seconds: float = 1.0
    ) -> None:
        self._store = store
        self._owner = owner
        self._lease = lease_seconds
        self._poll = poll_seconds

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        waited = False
        while not self._try(name):
            if not waited:
                logger.info("waiting for %s, held by %s", name, self._store.lock_owner(name))
                waited = True
            threading.Event().wait(self._poll)
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(name, stop), name=f"lock-{name[:20]}", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(5)
            try:
                self._store.release_lock(name, owner=self._owner)
            except Exception as exc:  # it expires by itself
                logger.warning("releasing %s failed: %s", name, exc)

    def _try(self, name: str) -> bool:
        try:
            return self._store.try_lock(name, owner=self._owner, lease_seconds=self._lease)
        except Exception as exc:
            logger.warning("taking %s failed, retrying: %s", name, exc)
            return False

    def _renew(self, name: str, stop: threading.Event) -> None:
        while not stop.wait(self._lease / 3):
            if not self._try(name):
                logger.warning("lost %s while holding it (store unreachable too long?)", name)


class LeaderLease:
    """Keeps trying to be (and stay) the deployment's leader; calls back on every change."""

    def __init__(
        self,
        store: NamedLeases,
        *,
        owner: str,
        lease_seconds: float,
        on_change: Callable[[bool], None] = lambda _leader: None,
    ) -> None:
        self._store = store
        self._owner = owner
        self._lease = lease_seconds
        self._on_change = on_change
        self._leader = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leader-lease", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._leader.is_set():
            self._set(False)
            try:
                # A clean stop hands over at once instead of after the lease.
                self._store.release_lock(LEADER_LOCK, owner=self._owner)
            except Exception as exc:
                logger.warning("releasing leadership failed: %s", exc)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                held = self._store.try_lock(
                    LEADER_LOCK, owner=self._owner, lease_seconds=self._lease
                )
            except Exception as exc:
                logger.warning("leader lease: store unreachable: %s", exc)
                held = False
            if held != self._leader.is_set():
                self._set(held)
            self._stopping.wait(self._lease / 3)

    def _set(self, leader: bool) -> None:
        if leader:
            self._leader.set()
            logger.info("%s is now the leader (reconciliation, sweeping, write-back)", self._owner)
        else:
            self._leader.clear()
            logger.warning("%s is no longer the leader", self._owner)
        try:
            self._on_change(leader)
        except Exception:
            logger.exception("leader change hook failed")
