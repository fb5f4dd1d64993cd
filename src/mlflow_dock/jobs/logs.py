"""Per-job build logs on disk, with every configured secret redacted before it is written."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

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


class BuildLogs:
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
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
        clean = self.redact(line.rstrip("\n"))
        with self._lock:
            self._dir.mkdir(parents=True, exist_ok=True)
            with self.path(job_id).open("a", encoding="utf-8") as fh:
                for part in clean.splitlines() or [""]:
                    fh.write(f"{stamp} {part}\n")

    def tail(self, job_id: str, lines: int = 50) -> list[str]:
        path = self.path(job_id)
        if not path.is_file():
            return []
        with path.open(encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=lines)]
