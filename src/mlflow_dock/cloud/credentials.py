"""What a registry credential provider is, and the token cache the cloud providers share.

A provider hands out a username/password pair per push or registry session. The providers are
one module each: `static` (the configured password), `ecr` (Amazon ECR tokens) and `google`
(Google access tokens); `providers.make_provider` picks one from the settings.

Cloud registries issue short-lived passwords (ECR: 12 h, Google: 1 h), so the cloud providers
fetch them from the ambient cloud identity (instance role, workload identity, key file) and
cache them here (`TokenCache`) until shortly before they expire. Such a provider is
*refreshable*: after a registry refuses its token, `invalidate()` and `get()` may yield a
working one. A static password that was refused stays refused, and callers (the registry
client, the engine push) ask `refreshable` rather than which provider they hold.

Secrets never appear in a message, a log line or a repr.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from mlflow_dock.errors import RetryableError

__all__ = [
    "Clock",
    "CredentialProvider",
    "Credentials",
    "TokenCache",
    "epoch",
    "one_line",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Wall-clock seconds since the epoch; cloud tokens carry absolute expiry times."""

_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class Credentials:
    """One username/password pair for a registry; `repr` and `str` hide the password."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"

    __str__ = __repr__

    def auth_config(self) -> dict[str, str]:
        """The per-push `auth_config` of the Docker Engine API (never written to disk)."""
        return {"username": self.username, "password": self.password}


@runtime_checkable
class CredentialProvider(Protocol):
    @property
    def refreshable(self) -> bool:
        """Whether `invalidate()` then `get()` can yield credentials the registry now accepts.

        True for tokens a cloud identity issues (they can be revoked or expire early, and the
        identity issues new ones); False for a configured password.
        """
        ...

    def get(self) -> Credentials:
        """Current credentials; cheap while cached, thread-safe."""
        ...

    def invalidate(self) -> None:
        """Forget a cached token (after a registry 401) so the next `get` fetches a new one."""
        ...


def one_line(text: str) -> str:
    """`text` on one line, shortened: cloud SDK messages can span lines and kilobytes."""
    line = " ".join(str(text).split())
    return line if len(line) <= _MESSAGE_LIMIT else line[: _MESSAGE_LIMIT - 3] + "..."


def epoch(value: Any, *, default: float) -> float:
    """An SDK's expiry (an aware or naive-UTC datetime, or epoch seconds) as epoch seconds."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return float(value.timestamp())
    if isinstance(value, int | float):
        return float(value)
    return default


@dataclass(frozen=True)
class _Entry:
    credentials: Credentials
    refresh_at: float
    expires_at: float
    # Set after a transient refresh failure: until then the old token is served untried.
    retry_at: float = 0.0


class TokenCache:
    """Credentials cached until `margin` before they expire, refreshed by one thread at a time.

    Readers take the fast path without the lock (reading one attribute is atomic); callers that
    find the token stale queue on the lock, so N concurrent pushes cause one fetch, not N.

    A transient refresh failure inside the margin is not a job failure: the old token still
    works, so it is served (and the refresh retried after `retry_interval`) until it is within
    `grace` of expiring; only then does the RetryableError reach the caller.
    """

    def __init__(
        self,
        *,
        fetch: Callable[[], tuple[Credentials, float]],
        clock: Clock,
        margin: float,
        grace: float = 60.0,
        retry_interval: float = 30.0,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._margin = margin
        self._grace = grace
        self._retry_interval = retry_interval
        self._lock = threading.Lock()
        self._entry: _Entry | None = None

    def _fresh(self, entry: _Entry | None, now: float) -> bool:
        if entry is None:
            return False
        if now < entry.refresh_at:
            return True
        return now < entry.retry_at and now < entry.expires_at - self._grace

    def get(self) -> Credentials:
        entry = self._entry
        if entry is not None and self._fresh(entry, self._clock()):
            return entry.credentials
        with self._lock:
            entry = self._entry
            now = self._clock()
            if entry is not None and self._fresh(entry, now):
                return entry.credentials
            try:
                credentials, expires_at = self._fetch()
            except RetryableError as exc:
                if entry is None or now >= entry.expires_at - self._grace:
                    raise
                logger.warning(
                    "%s; using the current token (expires in %.0f s), retrying in %.0f s",
                    exc,
                    entry.expires_at - now,
                    self._retry_interval,
                )
                self._entry = _Entry(
                    entry.credentials,
                    entry.refresh_at,
                    entry.expires_at,
                    retry_at=now + self._retry_interval,
                )
                return entry.credentials
            self._entry = _Entry(credentials, expires_at - self._margin, expires_at)
            return credentials

    def invalidate(self) -> None:
        with self._lock:
            self._entry = None
