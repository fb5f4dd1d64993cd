"""Build log lines as rows (the Celery executor's logs: workers and replicas share no disk)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select

from mlflow_dock.store.database import Part
from mlflow_dock.store.schema import LogLineRow


class LogLines(Part):
    def append_log_lines(self, job_id: str, lines: Sequence[str]) -> None:
        with self._db.write() as session:
            session.execute(
                insert(LogLineRow), [{"job_id": job_id, "line": line} for line in lines]
            )

    def log_tail(self, job_id: str, lines: int) -> list[str]:
        """The job's last `lines` log lines, oldest first (ids grow with every insert)."""
        with self._db.read() as session:
            newest = session.scalars(
                select(LogLineRow.line)
                .where(LogLineRow.job_id == job_id)
                .order_by(LogLineRow.id.desc())
                .limit(lines)
            ).all()
        return list(reversed(newest))
