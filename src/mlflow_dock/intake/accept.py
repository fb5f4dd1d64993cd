"""Accepting one delivery: verify, de-duplicate, parse and store. Never builds anything."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mlflow_dock.intake.events import AliasCreated, AliasDeleted, ModelVersionCreated, parse_event
from mlflow_dock.intake.signatures import WebhookVerifier
from mlflow_dock.jobs.model import Job
from mlflow_dock.jobs.store import JobStore
from mlflow_dock.observe.context import bind, log_context

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    job: Job
    duplicate: bool


class Intake:
    """Turns verified deliveries into stored jobs; `on_queued` hears of each new or requeued job."""

    def __init__(
        self,
        *,
        verifier: WebhookVerifier,
        store: JobStore,
        on_queued: Callable[[Job], None] = lambda _job: None,
    ) -> None:
        self._verifier = verifier
        self._store = store
        self._on_queued = on_queued

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        """Verify, de-duplicate, parse and store one delivery. Raises RequestError subclasses."""
        delivery_id = self._verifier.verify(body, headers)
        with log_context(delivery_id=delivery_id):
            return self._accept(delivery_id, body)

    def _accept(self, delivery_id: str, body: bytes) -> Accepted:
        existing = self._store.job_for_delivery(delivery_id)
        if existing is not None:
            logger.info("delivery %s seen before: job %s", delivery_id, existing.id)
            return Accepted(existing, duplicate=True)
        event = parse_event(body)
        data = event.data
        bind(model=data.name, version=getattr(data, "version", None))
        if isinstance(event, ModelVersionCreated):
            job, changed = self._store.request_build(
                event.data.name, event.data.version, delivery_id=delivery_id
            )
        elif isinstance(event, AliasCreated):
            job, changed = self._store.request_alias(
                event.data.name, event.data.version, event.data.alias, delivery_id=delivery_id
            )
        else:
            assert isinstance(event, AliasDeleted)
            job, changed = self._store.request_unalias(
                event.data.name, event.data.alias, delivery_id=delivery_id
            )
        bind(job_id=job.id, alias=job.alias)
        logger.info(
            "delivery %s: %s for '%s' -> %s job %s (%s)",
            delivery_id,
            event.kind,
            data.name,
            job.kind,
            job.id,
            "queued" if changed else f"existing, {job.state}",
        )
        if changed:
            self._on_queued(job)
        return Accepted(job, duplicate=not changed)
