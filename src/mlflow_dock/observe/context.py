"""Log context: the job or delivery a thread is handling, for every log line it emits.

Context variables, so each worker thread and each request carries its own; a `with
log_context(...)` block adds fields for its duration and restores the outer ones after.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

# The fields JSON log lines carry, in this order, when they are known.
FIELDS = ("job_id", "delivery_id", "model", "version", "alias")

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("mlflow_dock_log_context", default=_EMPTY)


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add `fields` (None values are skipped) to the log context of this block."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log context fields: {sorted(unknown)}")
    merged = dict(_context.get())
    merged.update({k: str(v) for k, v in fields.items() if v is not None})
    token = _context.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: str | None) -> None:
    """Add fields to the current block's context (e.g. once a delivery has been parsed)."""
    merged = dict(_context.get())
    merged.update({k: str(v) for k, v in fields.items() if v is not None and k in FIELDS})
    _context.set(MappingProxyType(merged))


def current() -> Mapping[str, str]:
    return _context.get()
