"""Durable job store on SQLAlchemy (an SQLite file by default; PostgreSQL for deployments).

The store is the only writer of job states. Claiming uses a conditional UPDATE (`... WHERE
state = 'queued'`) and checks the row count, so several workers, threads or processes can race
for the same job and exactly one wins.

A claimed job carries a lease: an `owner` and `lease_expires_at`, renewed by the worker's
heartbeat while it runs. Only a job whose lease expired goes back to the queue
(`reclaim_expired`, callable by any process), and finishing a job is guarded by its owner, so a
worker that lost its lease cannot overwrite the result of the worker that took the job over.
The same table-of-leases idea (`try_lock`) gives one leader per deployment and one runtime build
at a time, and `tag_writes` keeps MLflow write-back durable across restarts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, sessionmaker
from sqlalchemy.sql import Insert, Select

from mlflow_dock.errors import LeaseLostError, NotFoundError
from mlflow_dock.jobs.model import (
    TERMINAL_STATES,
    Job,
    JobKind,
    JobState,
    build_key,
    check_transition,
)
from mlflow_dock.jobs.steps import (
    ATTEMPT_FAILED,
    ATTEMPT_RETRY,
    STEP_FAILED,
    STEP_RUNNING,
    StepTiming,
    StoreFigures,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


# MLflow tag writes a job's new state calls for, as (model name, version, {tag: value or None
# to delete}); the write-back derives them (mlflow/writeback.py), the store only keeps them.
TagWrites = Callable[[Job], Sequence[tuple[str, str, Mapping[str, str | None]]]]


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
    # The lease of a RUNNING job: who runs it and until when, renewed by its heartbeat.
    owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # "<repository>@sha256:..." of the SBOM, signature and provenance attached to the image.
    sbom: Mapped[str | None] = mapped_column(String(700))
    signature: Mapped[str | None] = mapped_column(String(700))
    provenance: Mapped[str | None] = mapped_column(String(700))
    # When a message for this queued job was last handed to the broker (celery executor);
    # NULL means no message is out, so the sweeper sends one once the job is runnable.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class _LockRow(_Base):
    """A named lease: the deployment's leader, or the one worker building a runtime."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _TagWriteRow(_Base):
    """One MLflow model version tag still to be written (value NULL: delete the tag)."""

    __tablename__ = "tag_writes"
    __table_args__ = (UniqueConstraint("model_name", "version", "tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(500))
    version: Mapped[str] = mapped_column(String(32))
    tag: Mapped[str] = mapped_column(String(250))
    value: Mapped[str | None] = mapped_column(Text)
    # Bumped on every overwrite, so a flush only deletes the value it actually wrote.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class TagWrite:
    id: int
    model_name: str
    version: str
    tag: str
    value: str | None
    revision: int
    attempts: int


class _DeliveryRow(_Base):
    __tablename__ = "deliveries"

    delivery_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _MetaRow(_Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class _StepRow(_Base):
    """One timed step of one attempt of a job (see jobs/steps.py); seconds NULL while it runs."""

    __tablename__ = "job_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))


class _LogLineRow(_Base):
    """One build log line (Celery executor: workers and replicas share no disk, see logs.py)."""

    __tablename__ = "job_log_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    line: Mapped[str] = mapped_column(Text)


class _AttemptRow(_Base):
    """How one attempt ended: rows are never updated, so counts over them are true counters."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    # The step that failed first ("push", "smoke", ...); NULL for successful attempts.
    cause: Mapped[str | None] = mapped_column(String(32))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    bytes_uploaded: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_mounted: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_present: Mapped[int] = mapped_column(BigInteger, default=0)


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
        owner=row.owner,
        lease_expires_at=_aware(row.lease_expires_at),
        sbom=row.sbom,
        signature=row.signature,
        provenance=row.provenance,
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


_T = TypeVar("_T")


def _runtime_meta_key(key: str, repository: str) -> str:
    # Meta keys are short (100); runtime keys and repositories are not.
    return "runtime:" + hashlib.sha256(f"{key}\0{repository}".encode()).hexdigest()


def store_unavailable(exc: BaseException) -> bool:
    """Is this the database being unreachable (restarting, failing over), not a bug?"""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout)


# Aliases: inside JobStore, `list` names its method, not the type.
_StepTimings = list[StepTiming]
_Lines = list[str]
_Counts = list[int]


def _requeue(row: _JobRow, now: datetime) -> None:
    """Back to QUEUED, runnable at once, no lease and no message out."""
    row.state = JobState.QUEUED.value
    row.not_before = None
    row.owner = None
    row.lease_expires_at = None
    row.enqueued_at = None
    row.updated_at = now


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
    if url.startswith(("postgresql://", "postgres://")):
        # The driver the project ships is psycopg 3; SQLAlchemy's default would be psycopg2.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    # pre_ping: connections survive a database restart (the next checkout reconnects).
    return create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class DeliveryRequest:
    """One verified delivery for `JobStore.accept_deliveries` (version "" for UNALIAS)."""

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
        jobs = _Base.metadata.tables[_JobRow.__tablename__]
        deliveries = _Base.metadata.tables[_DeliveryRow.__tablename__]
        tags = _Base.metadata.tables[_TagWriteRow.__tablename__]
        upsert: Insert | None = None
        if dialect in ("sqlite", "postgresql"):
            insert_tag = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(tags)
            upsert = insert_tag.on_conflict_do_update(
                index_elements=[tags.c.model_name, tags.c.version, tags.c.tag],
                set_={
                    "value": insert_tag.excluded.value,
                    "revision": tags.c.revision + 1,
                    "attempts": 0,
                    "not_before": None,
                    "last_error": None,
                },
            )
        return cls(
            upsert_tag_write=upsert,
            jobs_of_deliveries=select(deliveries.c.delivery_id, jobs)
            .join(jobs, deliveries.c.job_id == jobs.c.id)
            .where(deliveries.c.delivery_id.in_(bindparam("ids", expanding=True))),
            builds_by_key=select(jobs).where(
                jobs.c.dedupe_key.in_(bindparam("keys", expanding=True))
            ),
            insert_jobs=insert(jobs),
            insert_deliveries=insert(deliveries),
        )


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
        # Replicas starting together race to create tables and add columns; the loser's DDL
        # fails because the winner's exists, and a second pass finds nothing left to do.
        for attempt in range(3):
            try:
                _Base.metadata.create_all(self._engine)
                self._add_missing_columns()
                break
            except DBAPIError:
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self._migrate_build_keys()

    def _add_missing_columns(self) -> None:
        """Add nullable columns newer code defines to tables an older version created.

        `create_all` creates missing tables only; this covers the additive changes (new
        nullable columns) without a migration tool.
        """
        inspector = inspect(self._engine)
        preparer = self._engine.dialect.identifier_preparer
        with self._engine.begin() as connection:
            for table in _Base.metadata.sorted_tables:
                existing = {c["name"] for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in existing or not column.nullable:
                        continue
                    kind = column.type.compile(dialect=self._engine.dialect)
                    connection.execute(
                        text(
                            f"ALTER TABLE {preparer.quote(table.name)} "
                            f"ADD COLUMN {preparer.quote(column.name)} {kind}"
                        )
                    )

    def _migrate_build_keys(self) -> None:
        """Rewrite dedupe keys from the old NUL-separated form (SQLite stores only)."""
        with self._write() as session:
            rows = session.execute(
                select(_JobRow).where(
                    _JobRow.kind == JobKind.BUILD.value,
                    _JobRow.dedupe_key.is_not(None),
                    ~_JobRow.dedupe_key.startswith("["),
                )
            ).scalars()
            for row in rows:
                row.dedupe_key = build_key(row.model_name, row.version)

    def close(self) -> None:
        self._engine.dispose()

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database without blocking writers (PASSIVE).

        Nothing to do for other databases. See jobs/checkpoint.py for why it runs apart.
        """
        if self._engine.dialect.name == "sqlite":
            with self._engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

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

    def _racing(self, operation: Callable[[], _T]) -> _T:
        # Two replicas accepting the same delivery (or the same version) at once: the loser's
        # INSERT hits a unique key, and running it again finds the winner's row.
        for _ in range(2):
            try:
                return operation()
            except IntegrityError:
                continue
        return operation()

    def request_build(
        self, model_name: str, version: str, *, delivery_id: str | None = None
    ) -> tuple[Job, bool]:
        """Return the version's build job, creating it if needed; (job, created_or_requeued).

        A failed build is queued again: a new event for the version is a request to try again.
        """
        return self._racing(lambda: self._request_build(model_name, version, delivery_id))

    def _request_build(
        self, model_name: str, version: str, delivery_id: str | None
    ) -> tuple[Job, bool]:
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
        return self._racing(
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
                version = self._last_alias_target(session, model_name, alias)
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
            # Another process may create it between our SELECT and INSERT: IntegrityError,
            # which `_racing` answers by running the request again.
            session.flush()
            return row, True
        if row.state == JobState.FAILED.value:
            check_transition(JobState.FAILED, JobState.QUEUED)
            _requeue(row, now)
            row.attempts = 0
            row.error = None
            row.permanent = False
            row.finished_at = None
            self._requeue_failed_aliases(session, row, now)
            return row, True
        return row, False

    def _requeue_failed_aliases(self, session: Session, build: _JobRow, now: datetime) -> None:
        """Alias jobs that failed because this build had failed wait for the rebuild again.

        Only where the failed job is still the alias's latest operation: a later set or delete
        of the same alias has superseded it.
        """
        later = aliased(_JobRow)
        newer_op = (
            select(later.id)
            .where(
                later.kind.in_([JobKind.ALIAS.value, JobKind.UNALIAS.value]),
                later.model_name == _JobRow.model_name,
                later.alias == _JobRow.alias,
                later.created_at > _JobRow.created_at,
            )
            .exists()
        )
        rows = session.execute(
            select(_JobRow).where(
                _JobRow.kind == JobKind.ALIAS.value,
                _JobRow.depends_on == build.id,
                _JobRow.state == JobState.FAILED.value,
                ~newer_op,
            )
        ).scalars()
        for alias_row in rows:
            _requeue(alias_row, now)
            alias_row.attempts = 0
            alias_row.error = None
            alias_row.permanent = False
            alias_row.finished_at = None

    def ping(self) -> None:
        """One cheap read of the jobs table (readiness probes); raises if the store is down."""
        with self._sessions() as session:
            session.execute(select(_JobRow.id).limit(1)).first()

    # -- accepting many deliveries at once (group commit) -------------------------------------

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
        return self._racing(lambda: self._accept_deliveries(requests, tag_writes))

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
        with self._write_lock, self._engine.begin() as connection:
            # Core statements on a plain connection: a Session's and the ORM's per-statement
            # work is most of this method's CPU time otherwise. Result rows have the columns'
            # names, so `_to_job` reads them like mapped rows. The rare branches run the
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
                    seen[row.delivery_id] = _to_job(row)  # type: ignore[arg-type]
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
                # The values `_new_row` sets, as plain data: ORM objects cost more CPU per
                # row than the INSERT itself. test_store pins both paths to the same rows.
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
                    row, changed = self._ensure_build(orm(), model_name, version)
                    job = _to_job(row)
                    builds[key] = job
                    return job, changed
                return _to_job(known), False  # type: ignore[arg-type]

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
                            target = self._last_alias_target(orm(), request.model_name, alias)
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
                    self._upsert_tag_writes_many(connection, writes)
            return results

    @functools.cached_property
    def _intake_statements(self) -> _IntakeStatements:
        return _IntakeStatements.build(self._engine.dialect.name)

    def record_tag_writes_many(
        self, writes: Sequence[tuple[str, str, Mapping[str, str | None]]]
    ) -> None:
        """`record_tag_writes` for many versions in one transaction (a batch of deliveries).

        Same rows and the same newest-value-wins rule; new tags (the common case: versions
        just created) become one multi-row INSERT.
        """
        if writes:
            self._racing(lambda: self._record_tag_writes_many(writes))

    def _record_tag_writes_many(
        self, writes: Sequence[tuple[str, str, Mapping[str, str | None]]]
    ) -> None:
        with self._write_lock, self._engine.begin() as connection:
            self._upsert_tag_writes_many(connection, writes)

    def _upsert_tag_writes_many(
        self, connection: Connection, writes: Sequence[tuple[str, str, Mapping[str, str | None]]]
    ) -> None:
        latest: dict[tuple[str, str, str], str | None] = {}
        for model_name, version, tags in writes:
            for tag, value in tags.items():
                latest[(model_name, version, tag)] = value
        if not latest:
            return
        table = _Base.metadata.tables[_TagWriteRow.__tablename__]
        upsert = self._intake_statements.upsert_tag_write
        if upsert is not None:
            # One upsert per tag (the keys are distinct, so even a multi-row form never
            # updates a row twice): no read first, and the same rows as below.
            connection.execute(
                upsert,
                [
                    {"model_name": m, "version": v, "tag": t, "value": value}
                    | {"revision": 0, "attempts": 0}
                    for (m, v, t), value in latest.items()
                ],
            )
            return
        existing: set[tuple[str, str, str]] = set()
        keys = list(latest)
        # One statement for every batch (an expanding IN list), not one built per batch.
        pending = select(table.c.model_name, table.c.version, table.c.tag).where(
            tuple_(table.c.model_name, table.c.version, table.c.tag).in_(
                bindparam("keys", expanding=True)
            )
        )
        for start in range(0, len(keys), 300):
            for row in connection.execute(pending, {"keys": keys[start : start + 300]}):
                existing.add((row.model_name, row.version, row.tag))
        for key in existing:
            model_name, version, tag = key
            connection.execute(
                update(table)
                .where(
                    table.c.model_name == model_name,
                    table.c.version == version,
                    table.c.tag == tag,
                )
                .values(
                    value=latest[key],
                    revision=table.c.revision + 1,
                    attempts=0,
                    not_before=None,
                    last_error=None,
                )
            )
        new = [
            {
                "model_name": m,
                "version": v,
                "tag": t,
                "value": value,
                "revision": 0,
                "attempts": 0,
            }
            for (m, v, t), value in latest.items()
            if (m, v, t) not in existing
        ]
        if new:
            connection.execute(insert(table), new)

    def _last_alias_target(self, session: Session, model_name: str, alias: str) -> str:
        return (
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

    # -- running jobs -----------------------------------------------------------------------

    def _runnable(self, now: datetime) -> ColumnElement[bool]:
        """Queued, past its backoff, its build (if any) finished, earlier alias ops done."""
        dep = aliased(_JobRow)
        prior = aliased(_JobRow)
        terminal = [st.value for st in TERMINAL_STATES]
        dependency_done = (
            select(dep.id).where(dep.id == _JobRow.depends_on, dep.state.in_(terminal)).exists()
        )
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
        return (
            (_JobRow.state == JobState.QUEUED.value)
            & or_(_JobRow.not_before.is_(None), _JobRow.not_before <= now)
            & or_(_JobRow.depends_on.is_(None), dependency_done)
            & or_(_JobRow.alias.is_(None), ~earlier_alias_op_pending)
        )

    def claim_next(self, *, owner: str, lease_seconds: float) -> Job | None:
        """Atomically move the oldest runnable job to RUNNING under `owner`'s lease."""
        now = utcnow()
        with self._write() as session:
            candidates = session.execute(
                select(_JobRow.id).where(self._runnable(now)).order_by(_JobRow.created_at).limit(5)
            ).scalars()
            for job_id in list(candidates):
                claimed = self._claim_row(session, job_id, owner, lease_seconds, now, now)
                if claimed is not None:
                    return claimed
        return None

    def claim(self, job_id: str, *, owner: str, lease_seconds: float) -> Job | None:
        """Claim one job by id (a task message names it); None if it is not runnable now.

        A job that is queued but not yet runnable (backoff, a build still running) loses its
        "message sent" mark, so the sweeper sends a new message once it is.
        """
        now = utcnow()
        with self._write() as session:
            claimed = self._claim_row(session, job_id, owner, lease_seconds, now, now)
            if claimed is None:
                session.execute(
                    update(_JobRow)
                    .where(_JobRow.id == job_id, _JobRow.state == JobState.QUEUED.value)
                    .values(enqueued_at=None)
                )
            return claimed

    def _claim_row(
        self,
        session: Session,
        job_id: str,
        owner: str,
        lease_seconds: float,
        now: datetime,
        runnable_at: datetime,
    ) -> Job | None:
        result = session.execute(
            update(_JobRow)
            .where(_JobRow.id == job_id, self._runnable(runnable_at))
            .values(
                state=JobState.RUNNING.value,
                attempts=_JobRow.attempts + 1,
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
        row = session.get(_JobRow, job_id, populate_existing=True)
        assert row is not None
        return _to_job(row)

    def renew_lease(self, job_id: str, *, owner: str, lease_seconds: float) -> bool:
        """Extend a running job's lease; False if `owner` no longer holds it."""
        now = utcnow()
        with self._write() as session:
            result = session.execute(
                update(_JobRow)
                .where(
                    _JobRow.id == job_id,
                    _JobRow.owner == owner,
                    _JobRow.state == JobState.RUNNING.value,
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def reclaim_expired(self) -> list[Job]:
        """Queue again every running job whose lease expired (its worker died or hung)."""
        now = utcnow()
        with self._write() as session:
            rows = list(
                session.execute(
                    select(_JobRow)
                    .where(
                        _JobRow.state == JobState.RUNNING.value,
                        # NULL: left running by a version without leases.
                        or_(_JobRow.lease_expires_at.is_(None), _JobRow.lease_expires_at < now),
                    )
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            for row in rows:
                check_transition(JobState.RUNNING, JobState.QUEUED)
                row.error = f"lease of {row.owner or 'an earlier process'} expired; queued again"
                _requeue(row, now)
            return [_to_job(r) for r in rows]

    def take_unsent(self, *, resend_after_seconds: float, limit: int = 100) -> list[str]:
        """Runnable queued jobs with no message out (or one sent too long ago); marks them sent.

        The celery sweeper sends a message for each id returned, so a message lost by a broker
        restart is replaced and a job that became runnable later is announced.
        """
        now = utcnow()
        stale = now - timedelta(seconds=resend_after_seconds)
        with self._write() as session:
            ids = list(
                session.execute(
                    select(_JobRow.id)
                    .where(self._runnable(now))
                    .where(or_(_JobRow.enqueued_at.is_(None), _JobRow.enqueued_at < stale))
                    .order_by(_JobRow.created_at)
                    .limit(limit)
                ).scalars()
            )
            if ids:
                session.execute(
                    update(_JobRow)
                    .where(_JobRow.id.in_(ids), _JobRow.state == JobState.QUEUED.value)
                    .values(enqueued_at=now)
                    .execution_options(synchronize_session=False)
                )
            return ids

    def mark_enqueued(self, job_id: str, *, sent: bool = True) -> None:
        """Record that a message for the queued job is out (or, `sent=False`, that it is not)."""
        with self._write() as session:
            session.execute(
                update(_JobRow)
                .where(_JobRow.id == job_id, _JobRow.state == JobState.QUEUED.value)
                .values(enqueued_at=utcnow() if sent else None)
            )

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
        owner: str | None = None,
        sbom: str | None = None,
        signature: str | None = None,
        provenance: str | None = None,
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
        with self._write() as session:
            row = session.get(_JobRow, job_id, with_for_update=True)
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
            job = _to_job(row)
            if tag_writes is not None:
                for model_name, version, tags in tag_writes(job):
                    self._upsert_tag_writes(session, model_name, version, tags)
                session.flush()
            return job

    # -- named leases (leader election, runtime builds) ----------------------------------------

    def try_lock(self, name: str, *, owner: str, lease_seconds: float) -> bool:
        """Take or renew the named lease; True while `owner` holds it.

        Free, expired or already ours: taken (renewed). Held by another owner: False.
        """
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        try:
            with self._write() as session:
                result = session.execute(
                    update(_LockRow)
                    .where(
                        _LockRow.name == name,
                        or_(_LockRow.owner == owner, _LockRow.expires_at < now),
                    )
                    .values(owner=owner, expires_at=expires)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    return True
                if session.get(_LockRow, name) is not None:
                    return False
                session.add(_LockRow(name=name, owner=owner, expires_at=expires))
                session.flush()
                return True
        except IntegrityError:
            return False  # another owner inserted it first

    def release_lock(self, name: str, *, owner: str) -> None:
        with self._write() as session:
            session.execute(delete(_LockRow).where(_LockRow.name == name, _LockRow.owner == owner))

    def lock_owner(self, name: str) -> str | None:
        with self._sessions() as session:
            row = session.get(_LockRow, name)
            if row is None or (_aware(row.expires_at) or utcnow()) < utcnow():
                return None
            return row.owner

    # -- durable MLflow write-back ----------------------------------------------------------

    def record_tag_writes(
        self, model_name: str, version: str, tags: Mapping[str, str | None]
    ) -> None:
        """Remember tags to write to a model version (None: delete the tag); newest value wins."""
        if not tags:
            return
        self._racing(lambda: self._record_tag_writes(model_name, version, tags))

    def _record_tag_writes(
        self, model_name: str, version: str, tags: Mapping[str, str | None]
    ) -> None:
        with self._write() as session:
            self._upsert_tag_writes(session, model_name, version, tags)
            session.flush()

    @staticmethod
    def _upsert_tag_writes(
        session: Session, model_name: str, version: str, tags: Mapping[str, str | None]
    ) -> None:
        for tag, value in tags.items():
            row = session.execute(
                select(_TagWriteRow).where(
                    _TagWriteRow.model_name == model_name,
                    _TagWriteRow.version == version,
                    _TagWriteRow.tag == tag,
                )
            ).scalar_one_or_none()
            if row is None:
                session.add(
                    _TagWriteRow(
                        model_name=model_name,
                        version=version,
                        tag=tag,
                        value=value,
                        revision=0,
                        attempts=0,
                    )
                )
            # The same value again is already pending: recording it twice (the outcome's
            # transaction, then a change hook) must not make MLflow see it twice.
            elif row.value != value:
                row.value = value
                row.revision += 1
                row.attempts = 0
                row.not_before = None
                row.last_error = None

    def pending_tag_writes(self, limit: int = 200) -> list[TagWrite]:
        now = utcnow()
        with self._sessions() as session:
            rows = session.execute(
                select(_TagWriteRow)
                .where(or_(_TagWriteRow.not_before.is_(None), _TagWriteRow.not_before <= now))
                .order_by(_TagWriteRow.id)
                .limit(limit)
            ).scalars()
            return [
                TagWrite(r.id, r.model_name, r.version, r.tag, r.value, r.revision, r.attempts)
                for r in rows
            ]

    def tag_write_done(self, write: TagWrite) -> None:
        """Forget a written tag unless a newer value arrived meanwhile."""
        with self._write() as session:
            session.execute(
                delete(_TagWriteRow).where(
                    _TagWriteRow.id == write.id, _TagWriteRow.revision == write.revision
                )
            )

    def tag_write_failed(self, write: TagWrite, error: str, retry_in_seconds: float) -> None:
        with self._write() as session:
            session.execute(
                update(_TagWriteRow)
                .where(_TagWriteRow.id == write.id, _TagWriteRow.revision == write.revision)
                .values(
                    attempts=_TagWriteRow.attempts + 1,
                    last_error=error[:1000],
                    not_before=utcnow() + timedelta(seconds=retry_in_seconds),
                )
            )

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

    def runtime_image(self, key: str, repository: str) -> str | None:
        """The digest of an image of runtime `key` in `repository` (see remember_runtime_image)."""
        with self._sessions() as session:
            row = session.get(_MetaRow, _runtime_meta_key(key, repository))
            return row.value if row else None

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None:
        """Recorded by the build that made it, before it lets go of the runtime's lock.

        Builds waiting for that lock read it to assemble on the new image at once: the job
        that built it may not have recorded its own outcome yet.
        """
        with self._write() as session:
            session.merge(_MetaRow(key=_runtime_meta_key(key, repository), value=digest))

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

    # -- build logs (Celery executor) ---------------------------------------------------------

    def append_log_lines(self, job_id: str, lines: Sequence[str]) -> None:
        with self._write() as session:
            session.execute(
                insert(_LogLineRow), [{"job_id": job_id, "line": line} for line in lines]
            )

    def log_tail(self, job_id: str, lines: int) -> _Lines:
        """The job's last `lines` log lines, oldest first (ids grow with every insert)."""
        with self._sessions() as session:
            newest = session.scalars(
                select(_LogLineRow.line)
                .where(_LogLineRow.job_id == job_id)
                .order_by(_LogLineRow.id.desc())
                .limit(lines)
            ).all()
        return list(reversed(newest))

    # -- step timings and attempt records (the board and /metrics) ----------------------------

    def start_step(self, job_id: str, attempt: int, name: str) -> int:
        with self._write() as session:
            row = _StepRow(
                job_id=job_id, attempt=attempt, name=name, started_at=utcnow(), outcome=STEP_RUNNING
            )
            session.add(row)
            session.flush()
            return row.id

    def finish_step(self, step_id: int, seconds: float, outcome: str) -> None:
        with self._write() as session:
            session.execute(
                update(_StepRow)
                .where(_StepRow.id == step_id)
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
        with self._write() as session:
            session.add(
                _AttemptRow(
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
                update(_StepRow)
                .where(
                    _StepRow.job_id == job_id,
                    _StepRow.attempt == attempt,
                    _StepRow.outcome == STEP_RUNNING,
                )
                .values(outcome=STEP_FAILED)
            )

    def steps_for(self, job_ids: Collection[str]) -> Mapping[str, Sequence[StepTiming]]:
        """Every recorded step of the given jobs, in the order they started."""
        found: dict[str, _StepTimings] = {job_id: [] for job_id in job_ids}
        if not found:
            return found
        with self._sessions() as session:
            rows = session.execute(
                select(_StepRow)
                .where(_StepRow.job_id.in_(list(found)))
                .order_by(_StepRow.attempt, _StepRow.id)
            ).scalars()
            for row in rows:
                found[row.job_id].append(
                    StepTiming(
                        job_id=row.job_id,
                        attempt=row.attempt,
                        name=row.name,
                        started_at=_aware(row.started_at),
                        seconds=row.seconds,
                        outcome=row.outcome,
                    )
                )
        return found

    def model_names(self) -> Sequence[str]:
        with self._sessions() as session:
            return (
                session.execute(select(_JobRow.model_name).distinct().order_by(_JobRow.model_name))
                .scalars()
                .all()
            )

    def first_delivery(self, job_id: str) -> str | None:
        """The delivery that created the job (None for reconciled or backfilled jobs)."""
        with self._sessions() as session:
            return session.execute(
                select(_DeliveryRow.delivery_id)
                .where(_DeliveryRow.job_id == job_id)
                .order_by(_DeliveryRow.received_at)
                .limit(1)
            ).scalar_one_or_none()

    def figures(
        self, *, bucket_bounds: Sequence[float], now: datetime | None = None
    ) -> StoreFigures:
        """Every store-derived metric in one read (aggregated in SQL where it can grow)."""
        now = now or utcnow()
        with self._sessions() as session:
            jobs = {
                (kind, state): count
                for kind, state, count in session.execute(
                    select(_JobRow.kind, _JobRow.state, func.count()).group_by(
                        _JobRow.kind, _JobRow.state
                    )
                )
            }
            waiting = session.execute(
                select(_JobRow.updated_at, _JobRow.not_before).where(
                    _JobRow.state == JobState.QUEUED.value
                )
            )
            oldest = 0.0
            depth = 0
            for updated_at, not_before in waiting:
                depth += 1
                # A job in backoff is not stuck until its retry time has passed.
                since = max(filter(None, (_aware(updated_at), _aware(not_before))))
                oldest = max(oldest, (now - since).total_seconds())
            attempts: dict[tuple[str, str], int] = {}
            retries: dict[str, int] = {}
            smoke_failures = 0
            for kind, outcome, cause, count in session.execute(
                select(
                    _AttemptRow.kind, _AttemptRow.outcome, _AttemptRow.cause, func.count()
                ).group_by(_AttemptRow.kind, _AttemptRow.outcome, _AttemptRow.cause)
            ):
                attempts[(kind, outcome)] = attempts.get((kind, outcome), 0) + count
                if outcome == ATTEMPT_RETRY and cause:
                    retries[cause] = retries.get(cause, 0) + count
                if outcome in (ATTEMPT_RETRY, ATTEMPT_FAILED) and cause == "smoke":
                    smoke_failures += count
            finished = _StepRow.seconds.is_not(None)
            steps: dict[str, tuple[_Counts, int, float]] = {}
            for row in session.execute(
                select(
                    _StepRow.name,
                    func.count(),
                    func.coalesce(func.sum(_StepRow.seconds), 0.0),
                    *(
                        func.sum(case((_StepRow.seconds <= bound, 1), else_=0))
                        for bound in bucket_bounds
                    ),
                )
                .where(finished)
                .group_by(_StepRow.name)
            ):
                name, count, total, *buckets = row
                steps[name] = ([int(b or 0) for b in buckets], int(count), float(total))
            uploaded, mounted, present = session.execute(
                select(
                    func.coalesce(func.sum(_AttemptRow.bytes_uploaded), 0),
                    func.coalesce(func.sum(_AttemptRow.bytes_mounted), 0),
                    func.coalesce(func.sum(_AttemptRow.bytes_present), 0),
                )
            ).one()
        return StoreFigures(
            jobs=jobs,
            queue_depth=depth,
            oldest_queued_seconds=max(0.0, oldest),
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
