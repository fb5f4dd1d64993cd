"""Step timings and attempt records: what the board shows per job and `/metrics` aggregates.

Written through `jobs.steps.StepRecorder` while a job runs; `figures` reads every
store-derived metric in one go at scrape time, aggregated in SQL where the tables can grow.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import aliased

from mlflow_dock.jobs.model import TERMINAL_STATES, JobKind, JobState, Lane, lane_of
from mlflow_dock.jobs.steps import (
    ATTEMPT_FAILED,
    ATTEMPT_RETRY,
    STEP_FAILED,
    STEP_RUNNING,
    StepTiming,
    StoreFigures,
)
from mlflow_dock.store.database import Part
from mlflow_dock.store.records import aware, utcnow
from mlflow_dock.store.schema import AttemptRow, JobRow, StepRow


class Telemetry(Part):
    def start_step(self, job_id: str, attempt: int, name: str) -> int:
        with self._db.write() as session:
            row = StepRow(
                job_id=job_id, attempt=attempt, name=name, started_at=utcnow(), outcome=STEP_RUNNING
            )
            session.add(row)
            session.flush()
            return row.id

    def finish_step(self, step_id: int, seconds: float, outcome: str) -> None:
        with self._db.write() as session:
            session.execute(
                update(StepRow)
                .where(StepRow.id == step_id)
                .values(seconds=seconds, outcome=outcome)
            )

    def record_attempt(
        self,
        job_id: str,
        attempt: int,
        *,
        kind: str,
        outcome: str,
        cause: str | None,
        blob_bytes: Mapping[str, int],
    ) -> None:
        with self._db.write() as session:
            session.add(
                AttemptRow(
                    job_id=job_id,
                    attempt=attempt,
                    kind=kind,
                    outcome=outcome,
                    cause=cause,
                    finished_at=utcnow(),
                    bytes_uploaded=blob_bytes.get("uploaded", 0),
                    bytes_mounted=blob_bytes.get("mounted", 0),
                    bytes_present=blob_bytes.get("present", 0),
                )
            )
            # A step left open by a worker that died ended with its attempt.
            session.execute(
                update(StepRow)
                .where(
                    StepRow.job_id == job_id,
                    StepRow.attempt == attempt,
                    StepRow.outcome == STEP_RUNNING,
                )
                .values(outcome=STEP_FAILED)
            )

    def steps_for(self, job_ids: Collection[str]) -> Mapping[str, Sequence[StepTiming]]:
        """Every recorded step of the given jobs, in the order they started."""
        found: dict[str, list[StepTiming]] = {job_id: [] for job_id in job_ids}
        if not found:
            return found
        with self._db.read() as session:
            rows = session.execute(
                select(StepRow)
                .where(StepRow.job_id.in_(list(found)))
                .order_by(StepRow.attempt, StepRow.id)
            ).scalars()
            for row in rows:
                found[row.job_id].append(
                    StepTiming(
                        job_id=row.job_id,
                        attempt=row.attempt,
                        name=row.name,
                        started_at=aware(row.started_at),
                        seconds=row.seconds,
                        outcome=row.outcome,
                    )
                )
        return found

    def figures(
        self, *, bucket_bounds: Sequence[float], now: datetime | None = None
    ) -> StoreFigures:
        """Every store-derived metric in one read (aggregated in SQL where it can grow)."""
        now = now or utcnow()
        with self._db.read() as session:
            jobs = {
                (kind, state): count
                for kind, state, count in session.execute(
                    select(JobRow.kind, JobRow.state, func.count()).group_by(
                        JobRow.kind, JobRow.state
                    )
                )
            }
            dep = aliased(JobRow)
            waiting = session.execute(
                select(
                    JobRow.kind, JobRow.updated_at, JobRow.not_before, dep.state, dep.finished_at
                )
                .outerjoin(dep, dep.id == JobRow.depends_on)
                .where(JobRow.state == JobState.QUEUED.value)
            )
            depth = dict.fromkeys(Lane, 0)
            oldest = dict.fromkeys(Lane, 0.0)
            terminal = {state.value for state in TERMINAL_STATES}
            for kind, updated_at, not_before, dep_state, dep_finished in waiting:
                lane = lane_of(JobKind(kind))
                depth[lane] += 1
                if dep_state is not None and dep_state not in terminal:
                    continue  # waiting for its version's build, not for a worker of its lane
                # Waiting since it was queued, its backoff ended or its build finished.
                since = max(
                    filter(None, (aware(updated_at), aware(not_before), aware(dep_finished)))
                )
                oldest[lane] = max(oldest[lane], (now - since).total_seconds())
            attempts: dict[tuple[str, str], int] = {}
            retries: dict[str, int] = {}
            smoke_failures = 0
            for kind, outcome, cause, count in session.execute(
                select(
                    AttemptRow.kind, AttemptRow.outcome, AttemptRow.cause, func.count()
                ).group_by(AttemptRow.kind, AttemptRow.outcome, AttemptRow.cause)
            ):
                attempts[(kind, outcome)] = attempts.get((kind, outcome), 0) + count
                if outcome == ATTEMPT_RETRY and cause:
                    retries[cause] = retries.get(cause, 0) + count
                if outcome in (ATTEMPT_RETRY, ATTEMPT_FAILED) and cause == "smoke":
                    smoke_failures += count
            finished = StepRow.seconds.is_not(None)
            steps: dict[str, tuple[list[int], int, float]] = {}
            for row in session.execute(
                select(
                    StepRow.name,
                    func.count(),
                    func.coalesce(func.sum(StepRow.seconds), 0.0),
                    *(
                        func.sum(case((StepRow.seconds <= bound, 1), else_=0))
                        for bound in bucket_bounds
                    ),
                )
                .where(finished)
                .group_by(StepRow.name)
            ):
                name, count, total, *buckets = row
                steps[name] = ([int(b or 0) for b in buckets], int(count), float(total))
            uploaded, mounted, present = session.execute(
                select(
                    func.coalesce(func.sum(AttemptRow.bytes_uploaded), 0),
                    func.coalesce(func.sum(AttemptRow.bytes_mounted), 0),
                    func.coalesce(func.sum(AttemptRow.bytes_present), 0),
                )
            ).one()
        return StoreFigures(
            jobs=jobs,
            queue_depth={lane.value: count for lane, count in depth.items()},
            oldest_queued_seconds={lane.value: max(0.0, age) for lane, age in oldest.items()},
            attempts=attempts,
            retries=retries,
            smoke_failures=smoke_failures,
            steps=steps,
            blob_bytes={
                "uploaded": int(uploaded),
                "mounted": int(mounted),
                "present": int(present),
            },
            bucket_bounds=tuple(bucket_bounds),
        )
