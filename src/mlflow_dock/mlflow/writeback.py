"""Writing job results back to MLflow as model version tags, so people see them where they work.

Tags set on the version:
    mlflow_dock.status          queued | running | succeeded | failed
    mlflow_dock.image           <registry>/<repository>@sha256:...   (after a successful push)
    mlflow_dock.error           the failure reason                    (only while failed)
    mlflow_dock.sbom            <registry>/<repository>@sha256:...   (the CycloneDX SBOM manifest)
    mlflow_dock.signature       <registry>/<repository>@sha256:...   (cosign signature manifest;
                                                                       only with a signing key)
    mlflow_dock.provenance      <registry>/<repository>@sha256:...   (SLSA provenance; ditto)
    mlflow_dock.modelcar        <registry>/<repository>@sha256:...   (the version's KServe
                                                                       Modelcar, if made)
    mlflow_dock.endpoints       what the image answers: "POST /invocations (MLflow scoring
                                protocol); POST /v2/models/<name>/versions/<N>/infer (Open
                                Inference Protocol, V2)" (V2 only where the image speaks it)
    mlflow_dock.alias.<alias>   <registry>/<repository>:<alias tag>   (while the alias points here)

Write-back never changes a job's outcome (the image in the registry is the product), but it is
durable: the tags to write are stored in the job store and retried until MLflow accepts them,
by one replica at a time (the leader), across restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlflow_dock.jobs.model import Job, JobKind, JobState, retry_delay
from mlflow_dock.mlflow.client import MlflowRefusedError, MlflowSource
from mlflow_dock.oci.reference import pinned
from mlflow_dock.serving.layer import v2_infer_path

logger = logging.getLogger(__name__)

TAG_PREFIX = "mlflow_dock."
STATUS_TAG = f"{TAG_PREFIX}status"
# MLflow's refusals that no later attempt changes: the version does not exist (a webhook or
# reconciliation named one MLflow never had) or the value is invalid. Credential refusals are
# not here: an operator can fix those, and the tags then still arrive.
_NOTHING_TO_RETRY = frozenset(
    {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
)
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
        tags = {STATUS_TAG: job.state.value}
        deletes: tuple[str, ...] = ()
        if job.state is JobState.SUCCEEDED and job.image and job.digest:
            tags[f"{TAG_PREFIX}image"] = pinned(job.image, job.digest)
            for name, reference in (
                ("sbom", job.sbom),
                ("signature", job.signature),
                ("provenance", job.provenance),
                ("modelcar", job.modelcar),
            ):
                if reference:
                    tags[f"{TAG_PREFIX}{name}"] = reference
            tags[f"{TAG_PREFIX}endpoints"] = endpoints(job)
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


def endpoints(job: Job) -> str:
    """The protocols a version's image answers, as one line a person can act on."""
    described = ["POST /invocations (MLflow scoring protocol)"]
    if job.v2_model:
        path = v2_infer_path(job.v2_model, job.version)
        described.append(f"POST {path} (Open Inference Protocol, V2)")
    return "; ".join(described)


def tag_writes_for(job: Job) -> list[tuple[str, str, dict[str, str | None]]]:
    """`updates_for` as the store records it: (model, version, {tag: value, None: delete}).

    Passed to the store's outcome methods (`succeed`, `fail`, `retry_later`) so a job's
    outcome and the tags it calls for are committed together.
    """
    return [
        (u.model_name, u.version, {**u.set_tags, **dict.fromkeys(u.delete_tags)})
        for u in updates_for(job)
    ]


class PendingTag(Protocol):
    @property
    def model_name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def tag(self) -> str: ...
    @property
    def value(self) -> str | None: ...  # None: delete the tag
    @property
    def attempts(self) -> int: ...


class TagWriteStore(Protocol):
    """Where pending tag writes live (the job store): durable, shared by every replica."""

    def record_tag_writes(
        self, model_name: str, version: str, tags: Mapping[str, str | None]
    ) -> None: ...

    def pending_tag_writes(self, limit: int = ...) -> Sequence[PendingTag]: ...

    def tag_write_done(self, write: Any) -> None: ...

    def tag_write_failed(self, write: Any, error: str, retry_in_seconds: float) -> None: ...


class MlflowWriteBack:
    """Durable write-back: job changes become stored tag writes, which the leader applies.

    `job_changed` (any process: a replica, a celery worker) only records the tags in the store,
    newest value per tag winning. `start` runs a flusher that, while `is_leader()` says so,
    applies pending writes and forgets each once MLflow has it. A failed write stays pending
    with a capped backoff, however long MLflow is down; a restart or a new leader picks up
    exactly where the last one stopped.
    """

    def __init__(
        self,
        source: MlflowSource,
        store: TagWriteStore,
        *,
        interval_seconds: float = 2.0,
        max_backoff_seconds: float = 60.0,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self._source = source
        self._store = store
        self._interval = interval_seconds
        self._max_backoff = max_backoff_seconds
        self._is_leader = is_leader
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="mlflow-writeback", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def job_changed(self, job: Job) -> None:
        """Record the tags the job's state calls for; never raises.

        For states recorded elsewhere (a claim, an intake); an outcome the worker recorded
        with `tag_writes` already holds its tags, and recording the same values again is a
        no-op in the store.
        """
        for model_name, version, tags in tag_writes_for(job):
            try:
                self._store.record_tag_writes(model_name, version, tags)
            except Exception as exc:
                logger.warning(
                    "recording MLflow tags for '%s' version %s failed: %s",
                    model_name,
                    version,
                    _short(exc),
                )
        self._wake.set()

    def flush_once(self) -> int:
        """Apply what is pending now; returns how many tags were written."""
        groups: dict[tuple[str, str], list[PendingTag]] = {}
        for write in self._store.pending_tag_writes():
            groups.setdefault((write.model_name, write.version), []).append(write)
        written = 0
        for (model_name, version), writes in groups.items():
            # MLflow takes one tag per call, so a reader may see any prefix of them: the status
            # goes last, as it is what people and scripts wait on. Once it says "failed", the
            # error is there; once "succeeded", the image is (deletes go first, see update_tags).
            sets = {
                w.tag: w.value
                for w in sorted(writes, key=lambda w: w.tag == STATUS_TAG)
                if w.value is not None
            }
            deletes = tuple(w.tag for w in writes if w.value is None)
            try:
                self._source.update_tags(model_name, version, sets, deletes)
            except MlflowRefusedError as exc:
                if exc.code not in _NOTHING_TO_RETRY:
                    self._backoff(writes, exc)
                    continue
                # The version is gone (or MLflow refuses the value): retrying forever would
                # only repeat the answer. Credentials errors, by contrast, can be fixed.
                logger.error(
                    "MLflow refused tags for '%s' version %s; dropped: %s",
                    model_name,
                    version,
                    _short(exc),
                )
                for write in writes:
                    self._store.tag_write_done(write)
                continue
            except Exception as exc:
                self._backoff(writes, exc)
                continue
            for write in writes:
                self._store.tag_write_done(write)
            written += len(writes)
        return written

    def _backoff(self, writes: list[PendingTag], exc: Exception) -> None:
        """Keep the writes pending, due again after a capped, growing delay."""
        model_name, version = writes[0].model_name, writes[0].version
        attempts = max(w.attempts for w in writes) + 1
        delay = retry_delay(attempts + 1, 1.0, self._max_backoff)
        logger.warning(
            "writing tags to MLflow for '%s' version %s failed (attempt %d, next in %.0f s): %s",
            model_name,
            version,
            attempts,
            delay,
            _short(exc),
        )
        for write in writes:
            self._store.tag_write_failed(write, _short(exc), delay)

    def flush(self, timeout: float = 30.0) -> None:
        """Apply pending writes until none is due or `timeout` passes (tests, CLI)."""
        deadline = time.monotonic() + timeout
        while self._store.pending_tag_writes(limit=1) and time.monotonic() < deadline:
            self.flush_once()
            time.sleep(0.05)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopping.is_set() or not self._is_leader():
                continue
            try:
                self.flush_once()
            except Exception as exc:
                logger.warning(
                    "MLflow write-back pass failed (store unreachable?): %s", _short(exc)
                )


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
