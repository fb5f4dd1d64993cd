"""Per-job build logs, with every configured secret redacted before it is written.

On disk (`BuildLogs`) when one machine runs everything; in the job store (`StoredBuildLogs`)
when builds run on workers elsewhere, so every replica's board and API show the same tail.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

_log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace each secret (longest first, so one containing another is fully hidden)."""
    for secret in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class Redactor:
    """The secrets to hide: the configured ones, plus tokens learned while running.

    Cloud credential providers fetch registry tokens at run time (ECR, Google); they `learn`
    each new token here, so build logs, job reasons and log lines hide it like a configured
    password. Tokens expire, so only the newest `keep_learned` are kept.
    """

    def __init__(self, secrets: Iterable[str] = (), *, keep_learned: int = 32) -> None:
        self._configured = tuple(s for s in secrets if s)
        self._learned: deque[str] = deque(maxlen=keep_learned)
        self._lock = threading.Lock()
        self._ordered = self._order()

    def learn(self, secret: str) -> None:
        if not secret or secret in self._configured:
            return
        with self._lock:
            if secret in self._learned:
                return
            self._learned.append(secret)
            self._ordered = self._order()

    def __call__(self, text: str) -> str:
        for secret in self._ordered:  # a tuple, swapped whole: safe to read without the lock
            text = text.replace(secret, REDACTED)
        return text

    def _order(self) -> tuple[str, ...]:
        # Longest first, so a secret containing another is fully hidden.
        values = {s for s in (*self._configured, *self._learned) if len(s) >= 3}
        return tuple(sorted(values, key=len, reverse=True))


class JobLogs(Protocol):
    """Where a job's build log goes and is read back from."""

    def redact(self, text: str) -> str: ...

    def append(self, job_id: str, line: str) -> None: ...

    def tail(self, job_id: str, lines: int = 50) -> list[str]: ...


def _stamped(line: str, redactor: Redactor) -> list[str]:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    clean = redactor(line.rstrip("\n"))
    return [f"{stamp} {part}" for part in clean.splitlines() or [""]]


class BuildLogs:
    """One file per job under the data directory: the embedded executor's logs."""

    def __init__(self, directory: Path, *, secrets: Iterable[str] | Redactor = ()) -> None:
        self._dir = directory
        self._redactor = secrets if isinstance(secrets, Redactor) else Redactor(secrets)
        self._lock = threading.Lock()

    def path(self, job_id: str) -> Path:
        # Job ids are UUIDs we generate; refuse anything else so a crafted id cannot escape.
        if not job_id.replace("-", "").isalnum():
            raise ValueError(f"invalid job id {job_id!r}")
        return self._dir / f"{job_id}.log"

    def redact(self, text: str) -> str:
        return self._redactor(text)

    def append(self, job_id: str, line: str) -> None:
        lines = _stamped(line, self._redactor)
        with self._lock:
            self._dir.mkdir(parents=True, exist_ok=True)
            with self.path(job_id).open("a", encoding="utf-8") as fh:
                fh.writelines(f"{part}\n" for part in lines)

    def tail(self, job_id: str, lines: int = 50) -> list[str]:
        path = self.path(job_id)
        if not path.is_file():
            return []
        with path.open(encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=lines)]


class LogLineStore(Protocol):
    def append_log_lines(self, job_id: str, lines: Sequence[str]) -> None: ...

    def log_tail(self, job_id: str, lines: int) -> list[str]: ...


class StoredBuildLogs:
    """Build log lines as rows of the job store (the Celery executor's logs).

    Workers on other machines share no disk with the replicas that serve the board and
    `/builds/{id}`; the store is the one thing they all reach. A line that cannot be stored
    (the store is down) is dropped with a warning rather than failing a build that is
    otherwise fine: the log is for people, the job's state and reason are the record.
    """

    def __init__(self, store: LogLineStore, *, secrets: Iterable[str] | Redactor = ()) -> None:
        self._store = store
        self._redactor = secrets if isinstance(secrets, Redactor) else Redactor(secrets)

    def redact(self, text: str) -> str:
        return self._redactor(text)

    def append(self, job_id: str, line: str) -> None:
        try:
            self._store.append_log_lines(job_id, _stamped(line, self._redactor))
        except Exception as exc:  # any store failure: see the class docstring
            _log.warning("build log line for job %s not stored: %s", job_id, type(exc).__name__)

    def tail(self, job_id: str, lines: int = 50) -> list[str]:
        return self._store.log_tail(job_id, lines)
