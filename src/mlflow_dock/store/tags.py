"""The MLflow tag outbox: tags to write to model versions, durable until MLflow accepts them.

Rows are written in the transaction of whatever calls for them (a job's outcome, a batch of
deliveries), so no crash can record a change and lose its tags; the leader's write-back
(mlflow/writeback.py) applies them and deletes what it wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

from sqlalchemy import Table, bindparam, delete, insert, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql import Insert

from mlflow_dock.store.database import Part, racing
from mlflow_dock.store.records import utcnow
from mlflow_dock.store.schema import TagWriteRow, metadata

# (model name, version, {tag: value, None: delete the tag}) for one model version.
VersionTags = tuple[str, str, Mapping[str, str | None]]


@dataclass(frozen=True)
class TagWrite:
    id: int
    model_name: str
    version: str
    tag: str
    value: str | None
    revision: int
    attempts: int


def _table() -> Table:
    return metadata.tables[TagWriteRow.__tablename__]


def upsert_statement(dialect: str) -> Insert | None:
    """INSERT ... ON CONFLICT DO UPDATE of one pending tag, on databases that have it."""
    if dialect not in ("sqlite", "postgresql"):
        return None
    tags = _table()
    insert_tag = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(tags)
    return insert_tag.on_conflict_do_update(
        index_elements=[tags.c.model_name, tags.c.version, tags.c.tag],
        set_={
            "value": insert_tag.excluded.value,
            "revision": tags.c.revision + 1,
            "attempts": 0,
            "not_before": None,
            "last_error": None,
        },
    )


def upsert_tag_writes(
    session: Session, model_name: str, version: str, tags: Mapping[str, str | None]
) -> None:
    """Store one version's tags in the session's transaction; the newest value wins."""
    for tag, value in tags.items():
        row = session.execute(
            select(TagWriteRow).where(
                TagWriteRow.model_name == model_name,
                TagWriteRow.version == version,
                TagWriteRow.tag == tag,
            )
        ).scalar_one_or_none()
        if row is None:
            session.add(
                TagWriteRow(
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


def upsert_tag_writes_many(
    connection: Connection, writes: Sequence[VersionTags], upsert: Insert | None
) -> None:
    """Many versions' tags on a plain connection's transaction (core statements only).

    `upsert`: `upsert_statement` for this database, built once by the caller.
    """
    latest: dict[tuple[str, str, str], str | None] = {}
    for model_name, version, tags in writes:
        for tag, value in tags.items():
            latest[(model_name, version, tag)] = value
    if not latest:
        return
    table = _table()
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


class TagOutbox(Part):
    """Pending MLflow tag writes: recorded by any process, applied by the leader."""

    def record_tag_writes(
        self, model_name: str, version: str, tags: Mapping[str, str | None]
    ) -> None:
        """Remember tags to write to a model version (None: delete the tag); newest value wins."""
        if not tags:
            return
        racing(lambda: self._record_tag_writes(model_name, version, tags))

    def _record_tag_writes(
        self, model_name: str, version: str, tags: Mapping[str, str | None]
    ) -> None:
        with self._db.write() as session:
            upsert_tag_writes(session, model_name, version, tags)
            session.flush()

    def record_tag_writes_many(self, writes: Sequence[VersionTags]) -> None:
        """`record_tag_writes` for many versions in one transaction (a batch of deliveries).

        Same rows and the same newest-value-wins rule; new tags (the common case: versions
        just created) become one multi-row INSERT.
        """
        if writes:
            racing(lambda: self._record_tag_writes_many(writes))

    def _record_tag_writes_many(self, writes: Sequence[VersionTags]) -> None:
        with self._db.write_connection() as connection:
            upsert_tag_writes_many(connection, writes, self._tag_upsert)

    @cached_property
    def _tag_upsert(self) -> Insert | None:
        return upsert_statement(self._db.dialect)

    def pending_tag_writes(self, limit: int = 200) -> list[TagWrite]:
        now = utcnow()
        with self._db.read() as session:
            rows = session.execute(
                select(TagWriteRow)
                .where(or_(TagWriteRow.not_before.is_(None), TagWriteRow.not_before <= now))
                .order_by(TagWriteRow.id)
                .limit(limit)
            ).scalars()
            return [
                TagWrite(r.id, r.model_name, r.version, r.tag, r.value, r.revision, r.attempts)
                for r in rows
            ]

    def tag_write_done(self, write: TagWrite) -> None:
        """Forget a written tag unless a newer value arrived meanwhile."""
        with self._db.write() as session:
            session.execute(
                delete(TagWriteRow).where(
                    TagWriteRow.id == write.id, TagWriteRow.revision == write.revision
                )
            )

    def tag_write_failed(self, write: TagWrite, error: str, retry_in_seconds: float) -> None:
        with self._db.write() as session:
            session.execute(
                update(TagWriteRow)
                .where(TagWriteRow.id == write.id, TagWriteRow.revision == write.revision)
                .values(
                    attempts=TagWriteRow.attempts + 1,
                    last_error=error[:1000],
                    not_before=utcnow() + timedelta(seconds=retry_in_seconds),
                )
            )
