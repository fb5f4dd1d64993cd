"""Every table of the service, on one `MetaData`: what Alembic's revisions must produce.

A change here needs a revision in `migrations/versions/` (tests/store/test_migrate.py fails
until the migrated schema matches these models again).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

metadata = MetaData()


class Base(DeclarativeBase):
    metadata = metadata


class JobRow(Base):
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
    # The version's KServe Modelcar, "<repository>@sha256:..." (imaging/modelcar.py), and the
    # name its image answers to over the Open Inference Protocol (NULL: MLflow's only).
    modelcar: Mapped[str | None] = mapped_column(String(700))
    v2_model: Mapped[str | None] = mapped_column(String(500))
    # When a message for this queued job was last handed to the broker (celery executor);
    # NULL means no message is out, so the sweeper sends one once the job is runnable.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LockRow(Base):
    """A named lease: the deployment's leader, or the one worker building a runtime."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TagWriteRow(Base):
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


class DeliveryRow(Base):
    __tablename__ = "deliveries"

    delivery_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class StepRow(Base):
    """One timed step of one attempt of a job (see jobs/steps.py); seconds NULL while it runs."""

    __tablename__ = "job_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))


class LogLineRow(Base):
    """One build log line (Celery executor: workers and replicas share no disk, see logs.py)."""

    __tablename__ = "job_log_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    line: Mapped[str] = mapped_column(Text)


class AttemptRow(Base):
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


class LayerRow(Base):
    """Which blob a package group's layer became, and where it was pushed (imaging/native.py)."""

    __tablename__ = "native_layers"

    # (registry host, layer key): mounts only work inside one registry.
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(100))
    diff_id: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    repository: Mapped[str] = mapped_column(String(512))
    label: Mapped[str] = mapped_column(String(1024))
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
