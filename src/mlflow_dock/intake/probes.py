"""Readiness: is this process able to do its work right now (for Kubernetes readiness probes)?

`/health` is liveness only (the process answers); `/ready` runs every `Readiness` check, each
bounded by a timeout, and reports each by name. A check is a callable that returns normally
when its dependency is usable and raises (or returns False) when it is not. Failure reasons
carry only the exception's type, never its message: messages of database and broker clients
can quote URLs and credentials, and the probe is unauthenticated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
from anyio import to_thread

logger = logging.getLogger(__name__)

Check = Callable[[], object]

DEFAULT_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Report:
    ready: bool
    checks: dict[str, str]  # name -> "ok" or why not

    def body(self) -> dict[str, object]:
        failing = sorted(name for name, state in self.checks.items() if state != "ok")
        return {
            "status": "ready" if self.ready else "not ready",
            "checks": self.checks,
            "not_ready": failing,
        }


class Readiness:
    """Named checks run concurrently, each in a worker thread and given `timeout` seconds."""

    def __init__(
        self, checks: Mapping[str, Check], *, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self._checks = dict(checks)
        self._timeout = timeout

    async def report(self) -> Report:
        results: dict[str, str] = {}

        async def run(name: str, check: Check) -> None:
            results[name] = await self._run(name, check)

        async with anyio.create_task_group() as group:
            for name, check in self._checks.items():
                group.start_soon(run, name, check)
        ordered = {name: results[name] for name in self._checks}
        return Report(all(v == "ok" for v in ordered.values()), ordered)

    async def _run(self, name: str, check: Check) -> str:
        try:
            with anyio.fail_after(self._timeout):
                # abandon_on_cancel: a hung dependency must not hang the probe; the thread is
                # left to finish on its own.
                outcome = await to_thread.run_sync(check, abandon_on_cancel=True)
        except TimeoutError:
            logger.warning("readiness check '%s' timed out after %.1f s", name, self._timeout)
            return f"timed out after {self._timeout:g} s"
        except Exception as exc:
            logger.warning("readiness check '%s' failed: %s", name, type(exc).__name__)
            return f"failed ({type(exc).__name__})"
        if outcome is False:
            return "down"
        return "ok"


def broker_check(url: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Check:
    """A check that opens (and closes) one connection to a Celery broker (Redis or AMQP)."""

    def check() -> None:
        from kombu import Connection  # type: ignore[attr-defined]

        with Connection(url, connect_timeout=timeout) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            # Redis transports connect lazily; a command proves the server answers.
            connection.default_channel  # noqa: B018

    return check
