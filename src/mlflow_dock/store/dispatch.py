"""The Celery dispatch outbox: which queued jobs have a message out (the `enqueued_at` mark).

The dispatcher marks a job before it sends and unmarks it when the send fails; the leader's
sweeper takes the runnable jobs without a mark (or with one older than the resend window), so a
message the broker lost is replaced and a job that became runnable later is announced.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta

from sqlalchemy import or_, select, update

from mlflow_dock.jobs.model import JobKind, JobState
from mlflow_dock.store.database import Part
from mlflow_dock.store.queue import of_kinds, runnable
from mlflow_dock.store.records import utcnow
from mlflow_dock.store.schema import JobRow


class DispatchMarks(Part):
    def take_unsent(
        self,
        *,
        resend_after_seconds: float,
        limit: int = 100,
        kinds: Collection[JobKind] | None = None,
    ) -> list[str]:
        """Runnable queued jobs with no message out (or one sent too long ago); marks them sent.

        The celery sweeper sends a message for each id returned, so a message lost by a broker
        restart is replaced and a job that became runnable later is announced. `kinds`: only
        jobs of these kinds (those the replicas' own lanes do not run); None: every kind.
        """
        now = utcnow()
        stale = now - timedelta(seconds=resend_after_seconds)
        with self._db.write() as session:
            ids = list(
                session.execute(
                    select(JobRow.id)
                    .where(runnable(), of_kinds(kinds))
                    .where(or_(JobRow.enqueued_at.is_(None), JobRow.enqueued_at < stale))
                    .order_by(JobRow.created_at)
                    .limit(limit)
                ).scalars()
            )
            if ids:
                session.execute(
                    update(JobRow)
                    .where(JobRow.id.in_(ids), JobRow.state == JobState.QUEUED.value)
                    .values(enqueued_at=now)
                    .execution_options(synchronize_session=False)
                )
            return ids

    def mark_enqueued(self, job_id: str, *, sent: bool = True) -> None:
        """Record that a message for the queued job is out (or, `sent=False`, that it is not)."""
        with self._db.write() as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value)
                .values(enqueued_at=utcnow() if sent else None)
            )
