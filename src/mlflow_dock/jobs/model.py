"""Job records and their state machine (pure: no I/O).

Only the store changes states, and only along the transitions in `_TRANSITIONS`; everything
else reads `Job` snapshots.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

LogSink = Callable[[str], None]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobKind(enum.StrEnum):
    BUILD = "build"
    ALIAS = "alias"  # point the alias tag at the version's image
    UNALIAS = "unalias"  # remove the alias tag where the registry allows it


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED})


class Lane(enum.StrEnum):
    """Which workers run a kind of job: builds take minutes, alias jobs move a tag.

    Alias jobs have a lane of their own so that they never wait behind builds (docs/scaling.md).
    """

    BUILD = "build"
    ALIAS = "alias"


LANE_KINDS: dict[Lane, frozenset[JobKind]] = {
    Lane.BUILD: frozenset({JobKind.BUILD}),
    Lane.ALIAS: frozenset({JobKind.ALIAS, JobKind.UNALIAS}),
}


def lane_of(kind: JobKind) -> Lane:
    return next(lane for lane, kinds in LANE_KINDS.items() if kind in kinds)


_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    # RUNNING -> QUEUED: a transient failure waits for its retry, or the job's lease expired
    # (its worker died or lost the store) and any worker may claim it again.
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED}),
    # A new event for a version whose build failed asks for it again.
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def check_transition(current: JobState, target: JobState) -> None:
    if target not in _TRANSITIONS[current]:
        raise InvalidTransition(f"job cannot go from {current} to {target}")


def build_key(model_name: str, version: str) -> str:
    """The identity of a build: one job per (model, version), whatever the delivery."""
    # A JSON array is unambiguous for any name (quotes and separators are escaped) and holds
    # no NUL byte, which PostgreSQL text columns refuse.
    return json.dumps(["build", model_name, version], ensure_ascii=False, separators=(",", ":"))


def retry_delay(attempt: int, base_seconds: float, cap_seconds: float = 300.0) -> float:
    """Exponential backoff for the attempt that just failed (1-based)."""
    # Jobs waiting out a long outage keep counting attempts; past ~1000 the float would
    # overflow, and the cap has long been reached anyway.
    exponent = min(max(0, attempt - 1), 60)
    return float(min(cap_seconds, base_seconds * 2**exponent))


@dataclass(frozen=True)
class Job:
    id: str
    kind: JobKind
    model_name: str
    version: str
    state: JobState
    alias: str | None = None
    depends_on: str | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    not_before: datetime | None = None
    image: str | None = None
    digest: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    error: str | None = None
    # Something worth knowing about a successful job (e.g. why a tag could not be removed).
    note: str | None = None
    # Set on failed jobs: True when retrying cannot help (reconciliation leaves those alone).
    permanent: bool = False
    # Supply-chain artifacts attached to a built image ("<repository>@sha256:..." of each).
    sbom: str | None = None
    signature: str | None = None
    provenance: str | None = None
    # The version's KServe Modelcar ("<repository>@sha256:...") and the name the image answers
    # to over the Open Inference Protocol (None: MLflow's protocol only), see imaging/modelcar.py.
    modelcar: str | None = None
    v2_model: str | None = None
    # The lease of a running job (see store/queue.py): which worker runs it, and until when.
    owner: str | None = None
    lease_expires_at: datetime | None = None

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


# MLflow tag writes a job's new state calls for, as (model name, version, {tag: value or None
# to delete}); the write-back derives them (mlflow/writeback.py), the store only keeps them.
TagWrites = Callable[[Job], Sequence[tuple[str, str, Mapping[str, str | None]]]]


@dataclass(frozen=True)
class JobOutcome:
    """What a successful job produced; the store records it."""

    image: str
    digest: str
    tags: tuple[str, ...] = ()
    note: str | None = None
    sbom: str | None = None
    signature: str | None = None
    provenance: str | None = None
    modelcar: str | None = None
    v2_model: str | None = None


class Runner(Protocol):
    """Runs one claimed job. The only thing `jobs` knows of how images are built."""

    def run(self, job: Job, log: LogSink) -> JobOutcome: ...
