"""Reading jobs: by id, by version, lists for the API and board, what reconciliation compares."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from mlflow_dock.errors import NotFoundError
from mlflow_dock.jobs.model import Job, JobKind, JobState, build_key
from mlflow_dock.store.database import Part
from mlflow_dock.store.records import to_job
from mlflow_dock.store.schema import DeliveryRow, JobRow

# Alias: inside JobReads, `list` names its method, not the type.
_Jobs = list[Job]


class JobReads(Part):
    def get(self, job_id: str) -> Job:
        with self._db.read() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"job {job_id} not found")
            return to_job(row)

    def build_for(self, model_name: str, version: str) -> Job | None:
        with self._db.read() as session:
            row = session.execute(
                select(JobRow).where(JobRow.dedupe_key == build_key(model_name, version))
            ).scalar_one_or_none()
            return to_job(row) if row else None

    def list(
        self,
        *,
        model_name: str | None = None,
        state: JobState | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> _Jobs:
        query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit).offset(offset)
        if model_name is not None:
            query = query.where(JobRow.model_name == model_name)
        if state is not None:
            query = query.where(JobRow.state == state.value)
        with self._db.read() as session:
            return [to_job(r) for r in session.execute(query).scalars()]

    def latest_image(self, model_name: str, *, repository: str, exclude_version: str) -> Job | None:
        """The newest successful build of another version pushed to `repository`."""
        with self._db.read() as session:
            row = session.execute(
                select(JobRow)
                .where(
                    JobRow.kind == JobKind.BUILD.value,
                    JobRow.model_name == model_name,
                    JobRow.state == JobState.SUCCEEDED.value,
                    JobRow.version != exclude_version,
                    JobRow.digest.is_not(None),
                    JobRow.image.startswith(f"{repository}:", autoescape=True),
                )
                .order_by(JobRow.finished_at.desc())
                .limit(1)
            ).scalar_one_or_none()
            return to_job(row) if row else None

    def repository_owner(self, repository: str, *, other_than: str) -> str | None:
        """Another model whose images this store published to ``repository``, if any."""
        with self._db.read() as session:
            return session.execute(
                select(JobRow.model_name)
                .where(
                    JobRow.kind == JobKind.BUILD.value,
                    JobRow.model_name != other_than,
                    JobRow.image.startswith(f"{repository}:", autoescape=True),
                )
                .limit(1)
            ).scalar_one_or_none()

    def builds_by_version(self) -> dict[tuple[str, str], Job]:
        with self._db.read() as session:
            rows = session.execute(
                select(JobRow).where(JobRow.kind == JobKind.BUILD.value)
            ).scalars()
            return {(r.model_name, r.version): to_job(r) for r in rows}

    def latest_alias_ops(self) -> dict[tuple[str, str], Job]:
        """The newest alias/unalias job per (model, alias)."""
        latest: dict[tuple[str, str], Job] = {}
        with self._db.read() as session:
            rows = session.execute(
                select(JobRow)
                .where(JobRow.kind.in_([JobKind.ALIAS.value, JobKind.UNALIAS.value]))
                .order_by(JobRow.created_at)
            ).scalars()
            for row in rows:
                latest[(row.model_name, row.alias or "")] = to_job(row)
        return latest

    def count_by_state(self) -> dict[JobState, int]:
        counts = {state: 0 for state in JobState}
        with self._db.read() as session:
            for state in session.execute(select(JobRow.state)).scalars():
                counts[JobState(state)] += 1
        return counts

    def model_names(self) -> Sequence[str]:
        with self._db.read() as session:
            return (
                session.execute(select(JobRow.model_name).distinct().order_by(JobRow.model_name))
                .scalars()
                .all()
            )

    def first_delivery(self, job_id: str) -> str | None:
        """The delivery that created the job (None for reconciled or backfilled jobs)."""
        with self._db.read() as session:
            return session.execute(
                select(DeliveryRow.delivery_id)
                .where(DeliveryRow.job_id == job_id)
                .order_by(DeliveryRow.received_at)
                .limit(1)
            ).scalar_one_or_none()
