"""Writing job results back to MLflow as model version tags, so people see them where they work.

Tags set on the version:
    mlflow_dock.status          queued | running | succeeded | failed
    mlflow_dock.image           <registry>/<repository>@sha256:...   (after a successful push)
    mlflow_dock.error           the failure reason                    (only while failed)
    mlflow_dock.sbom            <registry>/<repository>@sha256:...   (the CycloneDX SBOM manifest)
    mlflow_dock.signature       <registry>/<repository>@sha256:...   (cosign signature manifest;
                                                                       only with a signing key)
    mlflow_dock.provenance      <registry>/<repository>@sha256:...   (SLSA provenance; ditto)
    mlflow_dock.alias.<alias>   <registry>/<repository>:<alias tag>   (while the alias points here)

Write-back is best effort by design: a failure is logged and retried in the background and
never changes the job's outcome, because the image in the registry is the product.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.mlflow.client import MlflowSource
from mlflow_dock.oci.reference import pinned

logger = logging.getLogger(__name__)

TAG_PREFIX = "mlflow_dock."
_MAX_VALUE = 4000  # MLflow caps model version tag values at 5000 characters


@dataclass(frozen=True)
class TagUpdate:
    model_name: str
    version: str
    set_tags: dict[str, str] = field(default_factory=dict)
    delete_tags: tuple[str, ...] = ()


def updates_for(job: Job) -> list[TagUpdate]:
    """The tag changes a job's current state calls for (pure)."""
    if not job.version:
        return []
    if job.kind is JobKind.BUILD:
        tags = {f"{TAG_PREFIX}status": job.state.value}
        deletes: tuple[str, ...] = ()
        if job.state is JobState.SUCCEEDED and job.image and job.digest:
            tags[f"{TAG_PREFIX}image"] = pinned(job.image, job.digest)
            for name, reference in (
                ("sbom", job.sbom),
                ("signature", job.signature),
                ("provenance", job.provenance),
            ):
                if reference:
                    tags[f"{TAG_PREFIX}{name}"] = reference
            deletes = (f"{TAG_PREFIX}error",)
        elif job.state is JobState.FAILED:
            tags[f"{TAG_PREFIX}error"] = (job.error or "unknown error")[:_MAX_VALUE]
        return [TagUpdate(job.model_name, job.version, tags, deletes)]
    key = f"{TAG_PREFIX}alias.{job.alias}"
    if job.kind is JobKind.ALIAS and job.state is JobState.SUCCEEDED and job.image:
        return [TagUpdate(job.model_name, job.version, {key: job.image})]
    if job.kind is JobKind.UNALIAS and job.state is JobState.SUCCEEDED:
        return [TagUpdate(job.model_name, job.version, delete_tags=(key,))]
    return []


class MlflowWriteBack:
    """A background thread applying TagUpdates with retries; `job_changed` never blocks."""

    def __init__(
        self,
        source: MlflowSource,
        *,
        attempts: int = 6,
        backoff_seconds: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._source = source
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._sleep = sleep
        self._queue: queue.Queue[TagUpdate | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mlflow-writeback", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def job_changed(self, job: Job) -> None:
        for update in updates_for(job):
            self._queue.put(update)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until queued updates are applied (tests, CLI)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def _loop(self) -> None:
        while True:
            update = self._queue.get()
            try:
                if update is None:
                    return
                self._apply_with_retries(update)
            finally:
                self._queue.task_done()

    def _apply_with_retries(self, update: TagUpdate) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                self._source.update_tags(
                    update.model_name, update.version, update.set_tags, update.delete_tags
                )
                return
            except Exception as exc:
                level = logging.WARNING if attempt < self._attempts else logging.ERROR
                logger.log(
                    level,
                    "writing tags to MLflow for '%s' version %s failed (attempt %d/%d): %s",
                    update.model_name,
                    update.version,
                    attempt,
                    self._attempts,
                    " ".join(str(exc).split())[:300],
                )
                if attempt < self._attempts:
                    self._sleep(self._backoff * 2 ** (attempt - 1))
