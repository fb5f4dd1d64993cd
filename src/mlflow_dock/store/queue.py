"""The job queue: claims with leases, renewals, reclaiming expired leases, and outcomes.

Claiming uses a conditional UPDATE (`... WHERE state = 'queued'`) and checks the row count, so
several workers, threads or processes can race for the same job and exactly one wins.

A claimed job carries a lease: an `owner` and `lease_expires_at`, renewed by the worker's
heartbeat while it runs. Only a job whose lease expired goes back to the queue
(`reclaim_expired`, callable by any process), and finishing a job is guarded by its owner, so a
worker that lost its lease cannot overwrite the result of the worker that took the job over.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, bindparam, or_, select, true, update
from sqlalchemy.orm import Session

from mlflow_dock.errors import LeaseLostError, NotFoundError
from mlflow_dock.jobs.model import (
    TERMINAL_STATES,
    Job,
    JobKind,
    JobState,
    TagWrites,
    check_transition,
)
from mlflow_dock.store.database import Part
from mlflow_dock.store.records import aware, requeue, to_job, utcnow
from mlflow_dock.store.schema import JobRow
from mlflow_dock.store.tags import upsert_tag_writes

# Alias: inside JobQueue a method may shadow the builtin's name.
_Jobs = list[Job]

# Reads of candidates before a claim, when other workers keep winning the ones read.
_CLAIM_ROUNDS = 3


@functools.cache
def runnable() -> ColumnElement[bool]:
    """Queued, past its backoff, its build (if any) finished, earlier alias ops done.

    Built once per process (it is immutable; the time is read when a statement runs): making
    it took ~5 ms of CPU per claim, mostly copying the table's columns into its aliases, which
    the alias lane's polls (several a second) would otherwise pay each time.
    """
    now = bindparam("runnable_at", callable_=utcnow, type_=JobRow.not_before.type)
    jobs = JobRow.__table__
    dep = jobs.alias("dep")
    prior = jobs.alias("prior")
    terminal = [st.value for st in TERMINAL_STATES]
    dependency_done = (
        select(dep.c.id).where(dep.c.id == JobRow.depends_on, dep.c.state.in_(terminal)).exists()
    )
    # Operations on one alias run in the order their events arrived, so a set followed by
    # a delete (or a move) cannot be reordered by concurrent workers.
    earlier_alias_op_pending = (
        select(prior.c.id)
        .where(
            prior.c.kind.in_([JobKind.ALIAS.value, JobKind.UNALIAS.value]),
            prior.c.model_name == JobRow.model_name,
            prior.c.alias == JobRow.alias,
            prior.c.created_at < JobRow.created_at,
            prior.c.state.not_in(terminal),
        )
        .exists()
    )
    return (
        (JobRow.state == JobState.QUEUED.value)
        & or_(JobRow.not_before.is_(None), JobRow.not_before <= now)
        & or_(JobRow.depends_on.is_(None), dependency_done)
        & or_(JobRow.alias.is_(None), ~earlier_alias_op_pending)
    )


def of_kinds(kinds: Collection[JobKind] | None) -> ColumnElement[bool]:
    """Jobs of these kinds (a lane's); None: every kind."""
    if kinds is None:
        return true()
    return JobRow.kind.in_(sorted(kind.value for kind in kinds))


def _claim_row(
    session: Session,
    job_id: str,
    owner: str,
    lease_seconds: float,
    now: datetime,
) -> Job | None:
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, runnable())
        .values(
            state=JobState.RUNNING.value,
            attempts=JobRow.attempts + 1,
            started_at=now,
            updated_at=now,
            owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            enqueued_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = session.get(JobRow, job_id, populate_existing=True)
    assert row is not None
    return to_job(row)


class JobQueue(Part):
    """The only writer of job states once a job exists (see jobs/model.py's transitions)."""

    def claim_next(
        self,
        *,
        owner: str,
        lease_seconds: float,
        kinds: Collection[JobKind] | None = None,
    ) -> Job | None:
        """Atomically move the oldest runnable job of `kinds` (any if None) to RUNNING.

        The candidates are read outside the write lock, so a worker polling an empty lane
        never holds up the intake's commits (the alias lane polls several times a second);
        the conditional UPDATE checks again that each is still runnable. Candidates another
        worker won are read again, a few times, before giving up for this poll.
        """
        for _ in range(_CLAIM_ROUNDS):
            with self._db.read() as session:
                candidates = list(
                    session.execute(
                        select(JobRow.id)
                        .where(runnable(), of_kinds(kinds))
                        .order_by(JobRow.created_at)
                        .limit(5)
                    ).scalars()
                )
            if not candidates:
                return None
            with self._db.write() as session:
                now = utcnow()
                for job_id in candidates:
                    claimed = _claim_row(session, job_id, owner, lease_seconds, now)
                    if claimed is not None:
                        return claimed
        return None

    def claim(self, job_id: str, *, owner: str, lease_seconds: float) -> Job | None:
        """Claim one job by id (a task message names it); None if it is not runnable now.

        A job that is queued but not yet runnable (backoff, a build still running) loses its
        "message sent" mark, so the sweeper sends a new message once it is.
        """
        now = utcnow()
        with self._db.write() as session:
            claimed = _claim_row(session, job_id, owner, lease_seconds, now)
            if claimed is None:
                session.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value)
                    .values(enqueued_at=None)
                )
            return claimed

    def renew_lease(self, job_id: str, *, owner: str, lease_seconds: float) -> bool:
        """Extend a running job's lease; False if `owner` no longer holds it."""
        now = utcnow()
        with self._db.write() as session:
            result = session.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.owner == owner,
                    JobRow.state == JobState.RUNNING.value,
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def reclaim_expired(self, *, kinds: Collection[JobKind] | None = None) -> _Jobs:
        """Queue again every running job (of `kinds`) whose lease expired (its worker died)."""
        now = utcnow()
        with self._db.write() as session:
            rows = list(
                session.execute(
                    select(JobRow)
                    .where(
                        JobRow.state == JobState.RUNNING.value,
                        of_kinds(kinds),
                        # NULL: left running by a version without leases.
                        or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now),
                    )
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            for row in rows:
                check_transition(JobState.RUNNING, JobState.QUEUED)
                row.error = f"lease of {row.owner or 'an earlier process'} expired; queued again"
                requeue(row, now)
            return [to_job(r) for r in rows]

    def next_wakeup(self, *, kinds: Collection[JobKind] | None = None) -> datetime | None:
        """When the earliest backed-off job (of `kinds`) becomes runnable (a worker's sleep)."""
        with self._db.read() as session:
            value = session.execute(
                select(JobRow.not_before)
                .where(
                    JobRow.state == JobState.QUEUED.value,
                    JobRow.not_before.is_not(None),
                    of_kinds(kinds),
                )
                .order_by(JobRow.not_before)
                .limit(1)
            ).scalar_one_or_none()
            return aware(value)

    def succeed(
        self,
        job_id: str,
        *,
        image: str,
        digest: str,
        tags: tuple[str, ...] = (),
        note: str | None = None,
        owner: str | None = None,
        sbom: str | None = None,
        signature: str | None = None,
        provenance: str | None = None,
        modelcar: str | None = None,
        v2_model: str | None = None,
        tag_writes: TagWrites | None = None,
    ) -> Job:
        """Record a success; with `tag_writes`, its MLflow tags are stored in the same commit."""
        return self._transition(
            job_id,
            JobState.SUCCEEDED,
            owner,
            tag_writes,
            image=image,
            digest=digest,
            tags_json=json.dumps(list(tags)),
            finished_at=utcnow(),
            error=None,
            note=note,
            sbom=sbom,
            signature=signature,
            provenance=provenance,
            modelcar=modelcar,
            v2_model=v2_model,
        )

    def fail(
        self,
        job_id: str,
        reason: str,
        *,
        permanent: bool = True,
        owner: str | None = None,
        tag_writes: TagWrites | None = None,
    ) -> Job:
        return self._transition(
            job_id,
            JobState.FAILED,
            owner,
            tag_writes,
            error=reason,
            permanent=permanent,
            finished_at=utcnow(),
        )

    def retry_later(
        self,
        job_id: str,
        reason: str,
        delay_seconds: float,
        *,
        waiting: bool = False,
        owner: str | None = None,
        tag_writes: TagWrites | None = None,
    ) -> Job:
        """Queue the job again after `delay_seconds`.

        `waiting`: its retries for a transient cause ran out; it keeps waiting with a capped
        backoff (shown as "waiting: ...") instead of failing for a cause that may go away.
        """
        return self._transition(
            job_id,
            JobState.QUEUED,
            owner,
            tag_writes,
            error=f"{'waiting' if waiting else 'will retry'}: {reason}",
            not_before=utcnow() + timedelta(seconds=delay_seconds),
            enqueued_at=None,
        )

    def _transition(
        self,
        job_id: str,
        target: JobState,
        owner: str | None,
        tag_writes: TagWrites | None = None,
        **values: object,
    ) -> Job:
        """Move a job to `target`; with `owner`, only while that owner still holds its lease.

        `tag_writes`: the MLflow tags the new state calls for are stored in the same
        transaction (an outbox), so no crash can record the outcome and lose its tags.
        """
        with self._db.write() as session:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"job {job_id} not found")
            if owner is not None and (row.state != JobState.RUNNING.value or row.owner != owner):
                raise LeaseLostError(
                    f"job {job_id} is no longer held by {owner} "
                    f"(now {row.state}, owner {row.owner})"
                )
            check_transition(JobState(row.state), target)
            row.state = target.value
            row.updated_at = utcnow()
            row.owner = None
            row.lease_expires_at = None
            for name, value in values.items():
                setattr(row, name, value)
            session.flush()
            job = to_job(row)
            if tag_writes is not None:
                for model_name, version, tags in tag_writes(job):
                    upsert_tag_writes(session, model_name, version, tags)
                session.flush()
            return job
