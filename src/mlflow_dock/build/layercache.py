"""Layer-digest cache: which blob a package group's layer became, and where it was pushed.

Tarring and compressing numpy or torch again costs seconds to minutes; with this cache a known
package layer is neither re-tarred nor re-uploaded: the builder checks that the target
repository has the blob, or mounts it from the repository it was last pushed to.

Its own table on the job store's database (separate metadata, created on first use), so the
job store's schema is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import DateTime, Integer, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

__all__ = ["CachedLayer", "LayerCache"]


class _Base(DeclarativeBase):
    pass


class _LayerRow(_Base):
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


@dataclass(frozen=True)
class CachedLayer:
    digest: str
    diff_id: str
    size: int
    repository: str  # where the blob was last seen, to mount from


class LayerCache:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        _Base.metadata.create_all(engine)

    def get(self, host: str, key: str) -> CachedLayer | None:
        with self._sessions() as session:
            row = session.execute(
                select(_LayerRow).where(_LayerRow.host == host, _LayerRow.key == key)
            ).scalar_one_or_none()
            if row is None:
                return None
            return CachedLayer(row.digest, row.diff_id, row.size, row.repository)

    def put(self, host: str, key: str, layer: CachedLayer, *, label: str) -> None:
        # Two workers that built the same layer at once both find no row and insert: the
        # loser's INSERT hits the primary key, and merging again updates the winner's row.
        for attempt in range(2):
            try:
                with self._sessions.begin() as session:
                    session.merge(
                        _LayerRow(
                            host=host,
                            key=key,
                            digest=layer.digest,
                            diff_id=layer.diff_id,
                            size=layer.size,
                            repository=layer.repository,
                            label=label[:1024],
                            updated=datetime.now(UTC),
                        )
                    )
                return
            except IntegrityError:
                if attempt:
                    raise
