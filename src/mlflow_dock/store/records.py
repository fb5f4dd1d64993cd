"""Job rows as `Job` records and back, and the clock every part stamps rows with."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from mlflow_dock.jobs.model import Job, JobKind, JobState
from mlflow_dock.store.schema import JobRow


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes even for timezone-aware columns; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def to_job(row: JobRow) -> Job:
    """A `Job` from a mapped row, or from a core result row (it has the columns' names)."""
    return Job(
        id=row.id,
        kind=JobKind(row.kind),
        model_name=row.model_name,
        version=row.version,
        alias=row.alias,
        depends_on=row.depends_on,
        state=JobState(row.state),
        attempts=row.attempts,
        created_at=aware(row.created_at),
        started_at=aware(row.started_at),
        finished_at=aware(row.finished_at),
        not_before=aware(row.not_before),
        image=row.image,
        digest=row.digest,
        tags=tuple(json.loads(row.tags_json or "[]")),
        error=row.error,
        note=row.note,
        permanent=bool(row.permanent),
        owner=row.owner,
        lease_expires_at=aware(row.lease_expires_at),
        sbom=row.sbom,
        signature=row.signature,
        provenance=row.provenance,
        modelcar=row.modelcar,
        v2_model=row.v2_model,
    )


def new_row(
    kind: JobKind,
    model_name: str,
    version: str,
    *,
    dedupe_key: str | None = None,
    alias: str | None = None,
    depends_on: str | None = None,
) -> JobRow:
    now = utcnow()
    return JobRow(
        id=str(uuid.uuid4()),
        kind=kind.value,
        dedupe_key=dedupe_key,
        model_name=model_name,
        version=version,
        alias=alias,
        depends_on=depends_on,
        state=JobState.QUEUED.value,
        attempts=0,
        created_at=now,
        updated_at=now,
        tags_json="[]",
    )


def requeue(row: JobRow, now: datetime) -> None:
    """Back to QUEUED, runnable at once, no lease and no message out."""
    row.state = JobState.QUEUED.value
    row.not_before = None
    row.owner = None
    row.lease_expires_at = None
    row.enqueued_at = None
    row.updated_at = now
