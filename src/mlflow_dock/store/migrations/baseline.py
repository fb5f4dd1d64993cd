"""The tables of revision 0001: the schema mlflow-dock created with `create_all` before Alembic.

Frozen: never edit (a change of schema is a new revision). Revision 0001 creates these tables
on an empty database, and `store.migrate` uses them to bring a database made before Alembic
up to revision 0001 before stamping it (tables and nullable columns the old start-up added).
"""

from __future__ import annotations

import json

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

REVISION = "0001"


def tables() -> MetaData:
    """A fresh `MetaData` holding every table of revision 0001."""
    metadata = MetaData()
    Table(
        "jobs",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("dedupe_key", String(1100), unique=True),
        Column("model_name", String(500), nullable=False, index=True),
        Column("version", String(32), nullable=False),
        Column("alias", String(255)),
        Column("depends_on", String(36), ForeignKey("jobs.id")),
        Column("state", String(16), nullable=False, index=True),
        Column("attempts", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("started_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True)),
        Column("not_before", DateTime(timezone=True)),
        Column("image", String(600)),
        Column("digest", String(100)),
        Column("tags_json", Text, nullable=False),
        Column("error", Text),
        Column("note", Text),
        Column("permanent", Boolean, nullable=False),
        Column("owner", String(200)),
        Column("lease_expires_at", DateTime(timezone=True)),
        Column("sbom", String(700)),
        Column("signature", String(700)),
        Column("provenance", String(700)),
        Column("enqueued_at", DateTime(timezone=True)),
    )
    Table(
        "locks",
        metadata,
        Column("name", String(300), primary_key=True),
        Column("owner", String(200), nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "tag_writes",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("model_name", String(500), nullable=False),
        Column("version", String(32), nullable=False),
        Column("tag", String(250), nullable=False),
        Column("value", Text),
        Column("revision", Integer, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("not_before", DateTime(timezone=True)),
        Column("last_error", Text),
        UniqueConstraint("model_name", "version", "tag"),
    )
    Table(
        "deliveries",
        metadata,
        Column("delivery_id", String(200), primary_key=True),
        Column("job_id", String(36), ForeignKey("jobs.id"), nullable=False),
        Column("received_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "meta",
        metadata,
        Column("key", String(100), primary_key=True),
        Column("value", Text, nullable=False),
    )
    Table(
        "job_steps",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(36), ForeignKey("jobs.id"), nullable=False, index=True),
        Column("attempt", Integer, nullable=False),
        Column("name", String(32), nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("seconds", Float),
        Column("outcome", String(16), nullable=False),
    )
    Table(
        "job_log_lines",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(36), nullable=False, index=True),
        Column("line", Text, nullable=False),
    )
    Table(
        "job_attempts",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(36), ForeignKey("jobs.id"), nullable=False, index=True),
        Column("attempt", Integer, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("outcome", String(16), nullable=False),
        Column("cause", String(32)),
        Column("finished_at", DateTime(timezone=True), nullable=False),
        Column("bytes_uploaded", BigInteger, nullable=False),
        Column("bytes_mounted", BigInteger, nullable=False),
        Column("bytes_present", BigInteger, nullable=False),
    )
    Table(
        "native_layers",
        metadata,
        Column("host", String(255), primary_key=True),
        Column("key", String(64), primary_key=True),
        Column("digest", String(100), nullable=False),
        Column("diff_id", String(100), nullable=False),
        Column("size", Integer, nullable=False),
        Column("repository", String(512), nullable=False),
        Column("label", String(1024), nullable=False),
        Column("updated", DateTime(timezone=True), nullable=False),
    )
    return metadata


def build_key(model_name: str, version: str) -> str:
    """The dedupe key of a build at revision 0001 (`jobs.model.build_key` then)."""
    return json.dumps(["build", model_name, version], ensure_ascii=False, separators=(",", ":"))
