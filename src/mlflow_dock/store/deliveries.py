"""Intake: deliveries become jobs, one at a time or many in one transaction (group commit).

A delivery id is stored with the job it created, so a replayed delivery gets that job back
and queues nothing; a version has one build job whatever the number of its events; an alias
job waits for its version's build. Concurrent replicas racing on the same delivery or version
lose on a unique key and run again (`racing`), finding the winner's row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import Insert, Select

from mlflow_dock.jobs.model import Job, JobKind, JobState, TagWrites, build_key, check_transition
from mlflow_dock.store.database import Part, racing
from mlflow_dock.store.records import new_row, requeue, to_job, utcnow
from mlflow_dock.store.schema import DeliveryRow, JobRow, metadata
from mlflow_dock.store.tags import upsert_statement, upsert_tag_writes_many


@dataclass(frozen=True)
class DeliveryRequest:
    """One verified delivery for `Deliveries.accept_deliveries` (version "" for UNALIAS)."""

    delivery_id: str
    kind: JobKind
    model_name: str
    version: str
    alias: str | None = None


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    # Bounded IN lists: SQLite caps bound parameters per statement.
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class _IntakeStatements:
    """The statements of `accept_deliveries`, built once per store.

    Built per batch, their construction and cache-key generation (an IN list coerces each of
    its values) cost more CPU than executing them; expanding parameters take the lists.
    """

    jobs_of_deliveries: Select[Any]
    builds_by_key: Select[Any]
    insert_jobs: Insert
    insert_deliveries: Insert
    # INSERT ... ON CONFLICT DO UPDATE of one pending MLflow tag (databases that have it).
    upsert_tag_write: Insert | None

    @classmethod
    def build(cls, dialect: str) -> _IntakeStatements:
        jobs = metadata.tables[JobRow.__tablename__]
        deliveries = metadata.tables[DeliveryRow.__tablename__]
        return cls(
            upsert_tag_write=upsert_statement(dialect),
            jobs_of_deliveries=select(deliveries.c.delivery_id, jobs)
            .join(jobs, deliveries.c.job_id == jobs.c.id)
            .where(deliveries.c.delivery_id.in_(bindparam("ids", expanding=True))),
            builds_by_key=select(jobs).where(
                jobs.c.dedupe_key.in_(bindparam("keys", expanding=True))
            ),
            insert_jobs=insert(jobs),
            insert_deliveries=insert(deliveries),
        )


def _delivery_job(session: Session, delivery_id: str) -> JobRow | None:
    return session.execute(
        select(JobRow)
        .join(DeliveryRow, DeliveryRow.job_id == JobRow.id)
        .where(DeliveryRow.delivery_id == delivery_id)
    ).scalar_one_or_none()


def _record_delivery(session: Session, delivery_id: str, job_id: str) -> None:
    session.add(DeliveryRow(delivery_id=delivery_id, job_id=job_id, received_at=utcnow()))
    session.flush()


def _ensure_build(session: Session, model_name: str, version: str) -> tuple[JobRow, bool]:
    key = build_key(model_name, version)
    row = session.execute(select(JobRow).where(JobRow.dedupe_key == key)).scalar_one_or_none()
    now = utcnow()
    if row is None:
        row = new_row(JobKind.BUILD, model_name, version, dedupe_key=key)
        session.add(row)
        # Another process may create it between our SELECT and INSERT: IntegrityError,
        # which `racing` answers by running the request again.
        session.flush()
        return row, True
    if row.state == JobState.FAILED.value:
        check_transition(JobState.FAILED, JobState.QUEUED)
        requeue(row, now)
        row.attempts = 0
        row.error = None
        row.permanent = False
        row.finished_at = None
        _requeue_failed_aliases(session, row, now)
        return row, True
    return row, False


def _requeue_failed_aliases(session: Session, build: JobRow, now: datetime) -> None:
    """Alias jobs that failed because this build had failed wait for the rebuild again.

    Only where the failed job is still the alias's latest operation: a later set or delete
    of the same alias has superseded it.
    """
    later = aliased(JobRow)
    newer_op = (
        select(later.id)
        .where(
            later.kind.in_([JobKind.ALIAS.value, JobKind.UNALIAS.value]),
            later.model_name == JobRow.model_name,
            later.alias == JobRow.alias,
            later.created_at > JobRow.created_at,
        )
        .exists()
    )
    rows = session.execute(
        select(JobRow).where(
            JobRow.kind == JobKind.ALIAS.value,
            JobRow.depends_on == build.id,
            JobRow.state == JobState.FAILED.value,
            ~newer_op,
        )
    ).scalars()
    for alias_row in rows:
        requeue(alias_row, now)
        alias_row.attempts = 0
        alias_row.error = None
        alias_row.permanent = False
        alias_row.finished_at = None


def _last_alias_target(session: Session, model_name: str, alias: str) -> str:
    return (
        session.execute(
            select(JobRow.version)
            .where(
                JobRow.kind == JobKind.ALIAS.value,
                JobRow.model_name == model_name,
                JobRow.alias == alias,
            )
            .order_by(JobRow.created_at.desc())
            .limit(1)
        ).scalar_one_or_none()
        or ""
    )


class Deliveries(Part):
    """Deliveries and the jobs they ask for (what intake and reconciliation write)."""

    def job_for_delivery(self, delivery_id: str) -> Job | None:
        with self._db.read() as session:
            row = _delivery_job(session, delivery_id)
            return to_job(row) if row else None

    def request_build(
        self, model_name: str, version: str, *, delivery_id: str | None = None
    ) -> tuple[Job, bool]:
        """Return the version's build job, creating it if needed; (job, created_or_requeued).

        A failed build is queued again: a new event for the version is a request to try again.
        """
        return racing(lambda: self._request_build(model_name, version, delivery_id))

    def _request_build(
        self, model_name: str, version: str, delivery_id: str | None
    ) -> tuple[Job, bool]:
        with self._db.write() as session:
            if delivery_id is not None:
                existing = _delivery_job(session, delivery_id)
                if existing is not None:
                    return to_job(existing), False
            row, changed = _ensure_build(session, model_name, version)
            if delivery_id is not None:
                _record_delivery(session, delivery_id, row.id)
            return to_job(row), changed

    def request_alias(
        self, model_name: str, version: str, alias: str, *, delivery_id: str | None = None
    ) -> tuple[Job, bool]:
        """Queue an alias job that runs once the version's build has finished."""
        return self._request_alias_op(JobKind.ALIAS, model_name, version, alias, delivery_id)

    def request_unalias(
        self, model_name: str, alias: str, *, delivery_id: str | None = None
    ) -> tuple[Job, bool]:
        """Queue removal of an alias tag (MLflow's deleted event names no version)."""
        return self._request_alias_op(JobKind.UNALIAS, model_name, "", alias, delivery_id)

    def _request_alias_op(
        self,
        kind: JobKind,
        model_name: str,
        version: str,
        alias: str,
        delivery_id: str | None,
    ) -> tuple[Job, bool]:
        return racing(
            lambda: self._request_alias_op_once(kind, model_name, version, alias, delivery_id)
        )

    def _request_alias_op_once(
        self,
        kind: JobKind,
        model_name: str,
        version: str,
        alias: str,
        delivery_id: str | None,
    ) -> tuple[Job, bool]:
        with self._db.write() as session:
            if delivery_id is not None:
                existing = _delivery_job(session, delivery_id)
                if existing is not None:
                    return to_job(existing), False
            depends_on = None
            if kind is JobKind.ALIAS:
                build, _ = _ensure_build(session, model_name, version)
                depends_on = build.id
            else:
                # The deleted event names no version; the alias's last target is where its
                # MLflow tag has to be removed.
                version = _last_alias_target(session, model_name, alias)
            row = new_row(kind, model_name, version, alias=alias, depends_on=depends_on)
            session.add(row)
            session.flush()
            if delivery_id is not None:
                _record_delivery(session, delivery_id, row.id)
            return to_job(row), True

    # -- many deliveries at once (group commit) ----------------------------------------------

    def accept_deliveries(
        self, requests: Sequence[DeliveryRequest], *, tag_writes: TagWrites | None = None
    ) -> list[tuple[Job, bool]]:
        """Record many deliveries in ONE transaction; the same outcome as one call each, in order.

        For each request, (job, changed) exactly as `request_build`, `request_alias` or
        `request_unalias` would have returned it; a delivery id already stored, or earlier in
        `requests`, gives its job with changed=False. The common cases (a new version, an alias
        on a version) become a few multi-row INSERTs; the rare ones (a failed build asked for
        again, an alias deleted) run the single-request code on the same transaction.
        `tag_writes`: the MLflow tags of the jobs created or queued again are stored in the
        same transaction (as `record_tag_writes_many` would).
        """
        if not requests:
            return []
        return racing(lambda: self._accept_deliveries(requests, tag_writes))

    def _accept_deliveries(
        self, requests: Sequence[DeliveryRequest], tag_writes: TagWrites | None
    ) -> list[tuple[Job, bool]]:
        # The build key of each request ("" for UNALIAS), in order: a replayed delivery id
        # may come with another body, so keys go by position, not by delivery id.
        keys = [
            "" if r.kind is JobKind.UNALIAS else build_key(r.model_name, r.version)
            for r in requests
        ]
        ids = list(dict.fromkeys(r.delivery_id for r in requests))
        wanted_keys = list(dict.fromkeys(key for key in keys if key))
        statements = self._intake_statements
        with self._db.write_connection() as connection:
            # Core statements on a plain connection: a Session's and the ORM's per-statement
            # work is most of this method's CPU time otherwise. Result rows have the columns'
            # names, so `to_job` reads them like mapped rows. The rare branches run the
            # single-request code on an ORM session joined to this same transaction.
            session: Session | None = None

            def orm() -> Session:
                nonlocal session
                if session is None:
                    session = Session(bind=connection)
                return session

            seen: dict[str, Job] = {}
            for chunk in _chunks(ids):
                for row in connection.execute(statements.jobs_of_deliveries, {"ids": chunk}):
                    seen[row.delivery_id] = to_job(row)  # type: ignore[arg-type]
            # Build jobs by dedupe key: rows already stored, or Jobs created in this batch.
            builds: dict[str, Row[Any] | Job] = {}
            for chunk in _chunks(wanted_keys):
                for row in connection.execute(statements.builds_by_key, {"keys": chunk}):
                    builds[row.dedupe_key] = row
            new_jobs: list[dict[str, object]] = []
            new_deliveries: list[dict[str, object]] = []
            alias_targets: dict[tuple[str, str], str] = {}
            last_created = utcnow() - timedelta(seconds=1)

            def insert_pending() -> None:
                # Before any single-request code reads the table, it must see this batch's
                # rows, exactly as it would have after the earlier requests' own commits.
                if new_jobs:
                    connection.execute(statements.insert_jobs, new_jobs)
                    new_jobs.clear()
                if new_deliveries:
                    connection.execute(statements.insert_deliveries, new_deliveries)
                    new_deliveries.clear()

            def create(
                kind: JobKind,
                model_name: str,
                version: str,
                *,
                dedupe_key: str | None = None,
                alias: str | None = None,
                depends_on: str | None = None,
            ) -> Job:
                # The values `new_row` sets, as plain data: ORM objects cost more CPU per
                # row than the INSERT itself. tests/store pin both paths to the same rows.
                nonlocal last_created
                now = utcnow()
                # Alias operations run in created_at order: rows of one batch must not tie.
                if now <= last_created:
                    now = last_created + timedelta(microseconds=1)
                last_created = now
                job_id = str(uuid.uuid4())
                new_jobs.append(
                    {
                        "id": job_id,
                        "kind": kind.value,
                        "dedupe_key": dedupe_key,
                        "model_name": model_name,
                        "version": version,
                        "alias": alias,
                        "depends_on": depends_on,
                        "state": JobState.QUEUED.value,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                        "tags_json": "[]",
                    }
                )
                return Job(
                    id=job_id,
                    kind=kind,
                    model_name=model_name,
                    version=version,
                    state=JobState.QUEUED,
                    alias=alias,
                    depends_on=depends_on,
                    created_at=now,
                )

            def ensure_build(key: str, model_name: str, version: str) -> tuple[Job, bool]:
                known = builds.get(key)
                if known is None:
                    job = create(JobKind.BUILD, model_name, version, dedupe_key=key)
                    builds[key] = job
                    return job, True
                if isinstance(known, Job):
                    return known, False
                if known.state == JobState.FAILED.value:
                    insert_pending()
                    row, changed = _ensure_build(orm(), model_name, version)
                    job = to_job(row)
                    builds[key] = job
                    return job, changed
                return to_job(known), False  # type: ignore[arg-type]

            results: list[tuple[Job, bool]] = []
            for request, key in zip(requests, keys, strict=True):
                if request.delivery_id in seen:
                    results.append((seen[request.delivery_id], False))
                    continue
                if request.kind is JobKind.BUILD:
                    job, changed = ensure_build(key, request.model_name, request.version)
                else:
                    alias = request.alias or ""
                    if request.kind is JobKind.ALIAS:
                        build, _ = ensure_build(key, request.model_name, request.version)
                        alias_targets[(request.model_name, alias)] = request.version
                        job = create(
                            JobKind.ALIAS,
                            request.model_name,
                            request.version,
                            alias=request.alias,
                            depends_on=build.id,
                        )
                    else:
                        target = alias_targets.get((request.model_name, alias))
                        if target is None:
                            insert_pending()
                            target = _last_alias_target(orm(), request.model_name, alias)
                        job = create(
                            JobKind.UNALIAS, request.model_name, target, alias=request.alias
                        )
                    changed = True
                new_deliveries.append(
                    {"delivery_id": request.delivery_id, "job_id": job.id, "received_at": utcnow()}
                )
                seen[request.delivery_id] = job
                results.append((job, changed))
            insert_pending()
            if session is not None:
                # The requeued rows; committed with the INSERTs when the block ends.
                session.flush()
                session.close()
            if tag_writes is not None:
                queued = {job.id: job for job, changed in results if changed}
                writes = [write for job in queued.values() for write in tag_writes(job)]
                if writes:
                    upsert_tag_writes_many(connection, writes, statements.upsert_tag_write)
            return results

    @cached_property
    def _intake_statements(self) -> _IntakeStatements:
        return _IntakeStatements.build(self._db.dialect)
