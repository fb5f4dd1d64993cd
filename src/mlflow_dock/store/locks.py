"""Named leases: one leader per deployment, one runtime build at a time (see jobs/locks.py).

A lease is a row with an owner and an expiry: taking it is a conditional UPDATE (free, expired
or already ours) or, for a name never used, an INSERT that only one process can win.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError

from mlflow_dock.store.database import Part
from mlflow_dock.store.records import aware, utcnow
from mlflow_dock.store.schema import LockRow


class NamedLocks(Part):
    def try_lock(self, name: str, *, owner: str, lease_seconds: float) -> bool:
        """Take or renew the named lease; True while `owner` holds it.

        Free, expired or already ours: taken (renewed). Held by another owner: False.
        """
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        try:
            with self._db.write() as session:
                result = session.execute(
                    update(LockRow)
                    .where(
                        LockRow.name == name,
                        or_(LockRow.owner == owner, LockRow.expires_at < now),
                    )
                    .values(owner=owner, expires_at=expires)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    return True
                if session.get(LockRow, name) is not None:
                    return False
                session.add(LockRow(name=name, owner=owner, expires_at=expires))
                session.flush()
                return True
        except IntegrityError:
            return False  # another owner inserted it first

    def release_lock(self, name: str, *, owner: str) -> None:
        with self._db.write() as session:
            session.execute(delete(LockRow).where(LockRow.name == name, LockRow.owner == owner))

    def lock_owner(self, name: str) -> str | None:
        with self._db.read() as session:
            row = session.get(LockRow, name)
            if row is None or (aware(row.expires_at) or utcnow()) < utcnow():
                return None
            return row.owner
