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


class BuildLogs:
    def __init__(self, directory: Path, *, secrets: Iterable[str] = ()) -> None:
        self._dir = directory
        self._secrets = tuple(secrets)
        self._lock = threading.Lock()

    def path(self, job_id: str) -> Path:
        # Job ids are UUIDs we generate; refuse anything else so a crafted id cannot escape.
        if not job_id.replace("-", "").isalnum():
            raise ValueError(f"invalid job id {job_id!r}")
        return self._dir / f"{job_id}.log"

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

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
