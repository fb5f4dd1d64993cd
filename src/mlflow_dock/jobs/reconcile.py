"""Reconciliation: MLflow keeps no delivery history, so a webhook sent while mlflow-dock was down
is gone. Listing the registry and comparing it with the job store catches what was missed.

`plan` is pure; `Reconciler` does the I/O; `ReconcileLoop` runs it periodically in the service.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.mlflow.client import MlflowSource, ModelVersionInfo

logger = logging.getLogger(__name__)

# Versions still being registered (or that failed to register) have no artifacts to build.
_BUILDABLE_STATUSES = frozenset({"READY", "ModelVersionStatus.READY", ""})


@dataclass(frozen=True)
class Plan:
    builds: list[tuple[str, str]] = field(default_factory=list)
    aliases: list[tuple[str, str, str]] = field(default_factory=list)


def _wanted(job: Job | None) -> bool:
    """Does a version/alias with this latest job need one more?"""
    if job is None:
        return True
    # Transient failures that exhausted their retries get another chance; permanent ones
    # (model not found, broken image) would fail the same way every interval.
    return job.state is JobState.FAILED and not job.permanent


def plan(
    versions: list[ModelVersionInfo],
    aliases: list[tuple[str, str, str]],
    builds: dict[tuple[str, str], Job],
    alias_ops: dict[tuple[str, str], Job],
    *,
    since: datetime | None,
) -> Plan:
    """What to queue. `since` limits both builds and aliases to versions created after it."""
    since_ms = since.timestamp() * 1000 if since is not None else None
    in_scope = [
        mv
        for mv in versions
        if (mv.status or "") in _BUILDABLE_STATUSES
        and (since_ms is None or (mv.created_ms is not None and mv.created_ms >= since_ms))
    ]
    out = Plan()
    for mv in in_scope:
        if _wanted(builds.get((mv.name, mv.version))):
            out.builds.append((mv.name, mv.version))
    scope_keys = {(mv.name, mv.version) for mv in in_scope}
    for model, alias, version in aliases:
        if (model, version) not in scope_keys:
            continue
        latest = alias_ops.get((model, alias))
        up_to_date = (
            latest is not None
            and latest.kind is JobKind.ALIAS
            and latest.version == version
            and not _wanted(latest)
        )
        if not up_to_date:
            out.aliases.append((model, alias, version))
    return out


class ReconcileStore(Protocol):
    """What reconciliation compares MLflow with, and how it queues what is missing."""

    def builds_by_version(self) -> dict[tuple[str, str], Job]: ...

    def latest_alias_ops(self) -> dict[tuple[str, str], Job]: ...

    def request_build(
        self, model_name: str, version: str, *, delivery_id: str | None = ...
    ) -> tuple[Job, bool]: ...

    def request_alias(
        self, model_name: str, version: str, alias: str, *, delivery_id: str | None = ...
    ) -> tuple[Job, bool]: ...


class Reconciler:
    def __init__(self, source: MlflowSource, store: ReconcileStore) -> None:
        self._source = source
        self._store = store

    def run_once(self, *, model: str | None = None, since: datetime | None = None) -> list[Job]:
        """Queue builds and alias jobs for what MLflow has and the store lacks."""
        todo = plan(
            self._source.list_versions(model),
            self._source.list_aliases(model),
            self._store.builds_by_version(),
            self._store.latest_alias_ops(),
            since=since,
        )
        queued: list[Job] = []
        for name, version in todo.builds:
            job, changed = self._store.request_build(name, version)
            if changed:
                queued.append(job)
        for name, alias, version in todo.aliases:
            job, _ = self._store.request_alias(name, version, alias)
            queued.append(job)
        return queued


class ReconcileLoop:
    """Runs reconciliation at start and then every `interval` seconds, in its own thread.

    Only while `is_leader()` says so: one replica per deployment reconciles.
    """

    def __init__(
        self,
        reconciler: Reconciler,
        *,
        interval: float,
        since: datetime,
        on_queued: Callable[[Job], None],
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self._is_leader = is_leader
        self._reconciler = reconciler
        self._interval = interval
        self._since = since
        self._on_queued = on_queued
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mlflow-reconcile", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self._is_leader():
                # Check again soon: a new leader should not wait a whole interval.
                self._stopping.wait(min(self._interval, 5.0))
                continue
            try:
                queued = self._reconciler.run_once(since=self._since)
            except Exception as exc:
                logger.warning("reconciliation with MLflow failed: %s", " ".join(str(exc).split()))
            else:
                if queued:
                    logger.info(
                        "reconciliation queued %d job(s) for events MLflow did not deliver",
                        len(queued),
                    )
                    for job in queued:
                        self._on_queued(job)
            self._stopping.wait(self._interval)
