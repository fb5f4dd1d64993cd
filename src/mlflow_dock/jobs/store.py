"""Durable job store on SQLAlchemy (an SQLite file by default; PostgreSQL works the same).

The store is the only writer of job states. Claiming uses a conditional UPDATE (`... WHERE
state = 'queued'`) and checks the row count, so several workers, threads or processes can race
for the same job and exactly one wins; that is what later lets builds move to remote workers.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, sessionmaker

from mlflow_dock.errors import NotFoundError
from mlflow_dock.jobs.model import (
    TERMINAL_STATES,
    Job,
    JobKind,
    JobState,
    build_key,
    check_transition,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Base(DeclarativeBase):
    pass


class _JobRow(_Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    # Unique for builds so a version can only ever have one build job; NULL for alias jobs.
    dedupe_key: Mapped[str | None] = mapped_column(String(1100), unique=True)
    model_name: Mapped[str] = mapped_column(String(500), index=True)
    version: Mapped[str] = mapped_column(String(32))
    alias: Mapped[str | None] = mapped_column(String(255))
    depends_on: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    image: Mapped[str | None] = mapped_column(String(600))
    digest: Mapped[str | None] = mapped_column(String(100))
    tags_json: Mapped[str] = mapped_column(Text, default="[]")
    error: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    permanent: Mapped[bool] = mapped_column(Boolean, default=False)


class _DeliveryRow(_Base):
    __tablename__ = "deliveries"

    delivery_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _MetaRow(_Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes even for timezone-aware columns; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _to_job(row: _JobRow) -> Job:
    return Job(
        id=row.id,
        kind=JobKind(row.kind),
        model_name=row.model_name,
        version=row.version,
        alias=row.alias,
        depends_on=row.depends_on,
        state=JobState(row.state),
        attempts=row.attempts,
        created_at=_aware(row.created_at),
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        not_before=_aware(row.not_before),
        image=row.image,
        digest=row.digest,
        tags=tuple(json.loads(row.tags_json or "[]")),
        error=row.error,
        note=row.note,
        permanent=bool(row.permanent),
    )


def _new_row(
    kind: JobKind,
    model_name: str,
    version: str,
    *,
    dedupe_key: str | None = None,
    alias: str | None = None,
    depends_on: str | None = None,
) -> _JobRow:
    now = utcnow()
    return _JobRow(
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


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            # WAL lets the API read while a worker writes; synchronous=NORMAL is still durable
            # across process crashes (only an OS crash can lose the last transaction).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # SQLite allows one writer; serialising our own writes avoids "database is locked"
        # retries. Cross-process safety still comes from the conditional UPDATEs.
        self._write_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        store = cls(create_db_engine(url))
        store.create_schema()
        return store

    def create_schema(self) -> None:
        _Base.metadata.create_all(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions.begin() as session:
            yield session

    # -- accepting events -------------------------------------------------------------------

    def job_for_delivery(self, delivery_id: str) -> Job | None:
        with self._sessions() as session:
            row = session.execute(
                select(_JobRow)
                .join(_DeliveryRow, _DeliveryRow.job_id == _JobRow.id)
                .where(_DeliveryRow.delivery_id == delivery_id)
            ).scalar_one_or_none()
            return _to_job(row) if row else None

    def request_build(
        self, model_name: str, version: str, *, delivery_id: str | None = None
    ) -> tuple[Job, bool]:
        """Return the version's build job, creating it if needed; (job, created_or_requeued).

        A failed build is queued again: a new event for the version is a request to try again.
        """
        with self._write() as session:
            if delivery_id is not None:
                existing = self._delivery_job(session, delivery_id)
                if existing is not None:
                    return _to_job(existing), False
            row, changed = self._ensure_build(session, model_name, version)
            if delivery_id is not None:
                self._record_delivery(session, delivery_id, row.id)
            return _to_job(row), changed

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
        with self._write() as session:
            if delivery_id is not None:
                existing = self._delivery_job(session, delivery_id)
                if existing is not None:
                    return _to_job(existing), False
            depends_on = None
            if kind is JobKind.ALIAS:
                build, _ = self._ensure_build(session, model_name, version)
                depends_on = build.id
            else:
                # The deleted event names no version; the alias's last target is where its
                # MLflow tag has to be removed.
                version = (
                    session.execute(
                        select(_JobRow.version)
                        .where(
                            _JobRow.kind == JobKind.ALIAS.value,
                            _JobRow.model_name == model_name,
                            _JobRow.alias == alias,
                        )
                        .order_by(_JobRow.created_at.desc())
                        .limit(1)
                    ).scalar_one_or_none()
                    or ""
                )
            row = _new_row(kind, model_name, version, alias=alias, depends_on=depends_on)
            session.add(row)
            session.flush()
            if delivery_id is not None:
                self._record_delivery(session, delivery_id, row.id)
            return _to_job(row), True

    def _delivery_job(self, session: Session, delivery_id: str) -> _JobRow | None:
        return session.execute(
            select(_JobRow)
            .join(_DeliveryRow, _DeliveryRow.job_id == _JobRow.id)
            .where(_DeliveryRow.delivery_id == delivery_id)
        ).scalar_one_or_none()

    def _record_delivery(self, session: Session, delivery_id: str, job_id: str) -> None:
        session.add(_DeliveryRow(delivery_id=delivery_id, job_id=job_id, received_at=utcnow()))
        session.flush()

    def _ensure_build(
        self, session: Session, model_name: str, version: str
    ) -> tuple[_JobRow, bool]:
        key = build_key(model_name, version)
        row = session.execute(select(_JobRow).where(_JobRow.dedupe_key == key)).scalar_one_or_none()
        now = utcnow()
        if row is None:
            row = _new_row(JobKind.BUILD, model_name, version, dedupe_key=key)
            session.add(row)
            try:
                session.flush()
            except IntegrityError:
                # Another process created it between our SELECT and INSERT.
                session.rollback()
                raise
            return row, True
        if row.state == JobState.FAILED.value:
            check_transition(JobState.FAILED, JobState.QUEUED)
            row.state = JobState.QUEUED.value
            row.attempts = 0
            row.error = None
            row.permanent = False
            row.not_before = None
            row.finished_at = None
            row.updated_at = now
            return row, True
        return row, False

    # -- running jobs -----------------------------------------------------------------------

    def claim_next(self) -> Job | None:
        """Atomically move the oldest runnable job to RUNNING and return it."""
        now = utcnow()
        dep = aliased(_JobRow)
        prior = aliased(_JobRow)
        terminal = [s.value for s in TERMINAL_STATES]
        # Operations on one alias run in the order their events arrived, so a set followed by
        # a delete (or a move) cannot be reordered by concurrent workers.
        earlier_alias_op_pending = (
            select(prior.id)
            .where(
                prior.kind.in_([JobKind.ALIAS.value, JobKind.UNALIAS.value]),
                prior.model_name == _JobRow.model_name,
                prior.alias == _JobRow.alias,
                prior.created_at < _JobRow.created_at,
                prior.state.not_in(terminal),
            )
            .exists()
        )
        with self._write() as session:
            candidates = session.execute(
                select(_JobRow.id)
                .outerjoin(dep, dep.id == _JobRow.depends_on)
                .where(_JobRow.state == JobState.QUEUED.value)
                .where(or_(_JobRow.not_before.is_(None), _JobRow.not_before <= now))
                .where(or_(_JobRow.depends_on.is_(None), dep.state.in_(terminal)))
                .where(or_(_JobRow.alias.is_(None), ~earlier_alias_op_pending))
                .order_by(_JobRow.created_at)
                .limit(5)
            ).scalars()
            for job_id in list(candidates):
                result = session.execute(
                    update(_JobRow)
                    .where(_JobRow.id == job_id, _JobRow.state == JobState.QUEUED.value)
                    .values(
                        state=JobState.RUNNING.value,
                        attempts=_JobRow.attempts + 1,
                        started_at=now,
                        updated_at=now,
                    )
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    row = session.get(_JobRow, job_id, populate_existing=True)
                    assert row is not None
                    return _to_job(row)
        return None

    def next_wakeup(self) -> datetime | None:
        """When the earliest backed-off job becomes runnable (for the worker's sleep)."""
        with self._sessions() as session:
            value = session.execute(
                select(_JobRow.not_before)
                .where(_JobRow.state == JobState.QUEUED.value, _JobRow.not_before.is_not(None))
                .order_by(_JobRow.not_before)
                .limit(1)
            ).scalar_one_or_none()
            return _aware(value)

    def succeed(
        self,
        job_id: str,
        *,
        image: str,
        digest: str,
        tags: tuple[str, ...] = (),
        note: str | None = None,
    ) -> Job:
        return self._transition(
            job_id,
            JobState.SUCCEEDED,
            image=image,
            digest=digest,
            tags_json=json.dumps(list(tags)),
            finished_at=utcnow(),
            error=None,
            note=note,
        )

    def fail(self, job_id: str, reason: str, *, permanent: bool = True) -> Job:
        return self._transition(
            job_id, JobState.FAILED, error=reason, permanent=permanent, finished_at=utcnow()
        )

    def retry_later(self, job_id: str, reason: str, delay_seconds: float) -> Job:
        return self._transition(
            job_id,
            JobState.QUEUED,
            error=f"will retry: {reason}",
            not_before=utcnow() + timedelta(seconds=delay_seconds),
        )

    def requeue_interrupted(self) -> list[Job]:
        """Put jobs left RUNNING by a crashed or killed process back in the queue.

        Only safe while one process owns the store (the embedded worker pool); remote workers
        will need leases instead.
        """
        with self._write() as session:
            rows = list(
                session.execute(
                    select(_JobRow).where(_JobRow.state == JobState.RUNNING.value)
                ).scalars()
            )
            for row in rows:
                check_transition(JobState.RUNNING, JobState.QUEUED)
                row.state = JobState.QUEUED.value
                row.not_before = None
                row.updated_at = utcnow()
            return [_to_job(r) for r in rows]

    def _transition(self, job_id: str, target: JobState, **values: object) -> Job:
        with self._write() as session:
            row = session.get(_JobRow, job_id)
            if row is None:
                raise NotFoundError(f"job {job_id} not found")
            check_transition(JobState(row.state), target)
            row.state = target.value
            row.updated_at = utcnow()
            for name, value in values.items():
                setattr(row, name, value)
            session.flush()
            return _to_job(row)

    # -- reading ------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self._sessions() as session:
            row = session.get(_JobRow, job_id)
            if row is None:
                raise NotFoundError(f"job {job_id} not found")
            return _to_job(row)

    def build_for(self, model_name: str, version: str) -> Job | None:
        with self._sessions() as session:
            row = session.execute(
                select(_JobRow).where(_JobRow.dedupe_key == build_key(model_name, version))
            ).scalar_one_or_none()
            return _to_job(row) if row else None

    def list(
        self,
        *,
        model_name: str | None = None,
        state: JobState | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        query = select(_JobRow).order_by(_JobRow.created_at.desc()).limit(limit).offset(offset)
        if model_name is not None:
            query = query.where(_JobRow.model_name == model_name)
        if state is not None:
            query = query.where(_JobRow.state == state.value)
        with self._sessions() as session:
            return [_to_job(r) for r in session.execute(query).scalars()]

    def latest_image(self, model_name: str, *, repository: str, exclude_version: str) -> Job | None:
        """The newest successful build of another version pushed to `repository`."""
        with self._sessions() as session:
            row = session.execute(
                select(_JobRow)
                .where(
                    _JobRow.kind == JobKind.BUILD.value,
                    _JobRow.model_name == model_name,
                    _JobRow.state == JobState.SUCCEEDED.value,
                    _JobRow.version != exclude_version,
                    _JobRow.digest.is_not(None),
                    _JobRow.image.startswith(f"{repository}:", autoescape=True),
                )
                .order_by(_JobRow.finished_at.desc())
                .limit(1)
            ).scalar_one_or_none()
            return _to_job(row) if row else None

    def builds_by_version(self) -> dict[tuple[str, str], Job]:
        with self._sessions() as session:
            rows = session.execute(
                select(_JobRow).where(_JobRow.kind == JobKind.BUILD.value)
            ).scalars()
            return {(r.model_name, r.version): _to_job(r) for r in rows}

    def latest_alias_ops(self) -> dict[tuple[str, str], Job]:
        """The newest alias/unalias job per (model, alias)."""
        latest: dict[tuple[str, str], Job] = {}
        with self._sessions() as session:
            rows = session.execute(
                select(_JobRow)
                .where(_JobRow.kind.in_([JobKind.ALIAS.value, JobKind.UNALIAS.value]))
                .order_by(_JobRow.created_at)
            ).scalars()
            for row in rows:
                latest[(row.model_name, row.alias or "")] = _to_job(row)
        return latest

    def watch_since(self) -> datetime:
        """When this store first started watching MLflow (set once, on first call)."""
        with self._write() as session:
            row = session.get(_MetaRow, "watch_since")
            if row is None:
                row = _MetaRow(key="watch_since", value=utcnow().isoformat())
                session.add(row)
            return datetime.fromisoformat(row.value)

    def count_by_state(self) -> dict[JobState, int]:
        counts = {state: 0 for state in JobState}
        with self._sessions() as session:
            for state in session.execute(select(_JobRow.state)).scalars():
                counts[JobState(state)] += 1
        return counts
