"""Accepting deliveries: verify, parse, then de-duplicate and store. Never builds anything.

Verification and parsing are pure CPU work and run where the request is (the event loop for
`accept_async`); storing goes through a `GroupCommit`, so concurrent deliveries share one
transaction and each is answered only after that transaction has committed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from anyio import to_thread

from mlflow_dock.errors import PayloadError, UnavailableError
from mlflow_dock.intake.commit import GroupCommit
from mlflow_dock.intake.events import AliasCreated, ModelVersionCreated, may_be_deep, parse_event
from mlflow_dock.intake.signatures import WebhookVerifier
from mlflow_dock.jobs.model import Job, JobKind, TagWrites
from mlflow_dock.observe.context import log_context
from mlflow_dock.store.database import store_unavailable
from mlflow_dock.store.deliveries import DeliveryRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    job: Job
    duplicate: bool


class DeliveryStore(Protocol):
    """Where deliveries become jobs (`store.deliveries.Deliveries`)."""

    def job_for_delivery(self, delivery_id: str) -> Job | None: ...

    def accept_deliveries(
        self, requests: Sequence[DeliveryRequest], *, tag_writes: TagWrites | None = ...
    ) -> list[tuple[Job, bool]]: ...


class Intake:
    """Turns verified deliveries into stored jobs.

    `tag_writes` derives the MLflow tags of each job a batch creates or queues again; they are
    stored in the batch's own transaction. `on_queued` hears, once per committed batch and
    before its deliveries are answered, of those jobs.
    """

    def __init__(
        self,
        *,
        verifier: WebhookVerifier,
        store: DeliveryStore,
        tag_writes: TagWrites | None = None,
        on_queued: Callable[[Sequence[Job]], None] = lambda _jobs: None,
    ) -> None:
        self._verifier = verifier
        self._store = store
        self._tag_writes = tag_writes
        self._on_queued = on_queued
        self._batches: GroupCommit[DeliveryRequest, Accepted] = GroupCommit(self._commit)

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        """Verify, de-duplicate, parse and store one delivery. Raises RequestError subclasses."""
        delivery_id = self._verifier.verify(body, headers)
        try:
            request = _request(delivery_id, body)
        except PayloadError:
            existing = self._store.job_for_delivery(delivery_id)
            if existing is None:
                raise
            return Accepted(existing, duplicate=True)
        return self._commit([request])[0]

    async def accept_async(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        """`accept` for the event loop: the store write is shared with concurrent deliveries."""
        delivery_id = self._verifier.verify(body, headers)
        try:
            request = _request(delivery_id, body)
        except PayloadError:
            # Only an authentic body can get here; a replay of a delivery accepted by an older
            # version of the rules is still the job it was.
            existing = await to_thread.run_sync(self._store.job_for_delivery, delivery_id)
            if existing is None:
                raise
            return Accepted(existing, duplicate=True)
        return await self._batches.submit(request)

    def _commit(self, requests: Sequence[DeliveryRequest]) -> list[Accepted]:
        try:
            results = self._store.accept_deliveries(requests, tag_writes=self._tag_writes)
        except Exception as exc:
            # MLflow retries a 503 (and never a 500 it cannot tell from a bug), so a database
            # restart or fail-over loses no delivery.
            if store_unavailable(exc):
                raise UnavailableError("the job store is unavailable; retry later") from exc
            raise
        accepted = []
        queued: list[Job] = []
        debug = logger.isEnabledFor(logging.DEBUG)
        for request, (job, changed) in zip(requests, results, strict=True):
            # Per delivery at debug: at full intake rate one line each is a measurable share
            # of the CPU; the summary below (one line per batch) stays at info, rejects are
            # logged by the receiver. Each delivery's line carries its own context.
            if debug:
                with _context(request, job):
                    logger.debug("%s", _outcome_line(request, job, changed=changed))
            if changed:
                queued.append(job)
            accepted.append(Accepted(job, duplicate=not changed))
        if queued:
            self._on_queued(queued)
        if len(requests) == 1:
            request, job = requests[0], accepted[0].job
            with _context(request, job):
                logger.info("%s", _outcome_line(request, job, changed=bool(queued)))
        else:
            logger.info(
                "stored %d deliveries in one transaction: %d queued, %d existing",
                len(requests),
                len(queued),
                len(requests) - len(queued),
            )
        return accepted


def _context(request: DeliveryRequest, job: Job) -> AbstractContextManager[None]:
    """The log context of one delivery: its id, the job it became, model, version, alias."""
    return log_context(
        delivery_id=request.delivery_id,
        job_id=job.id,
        model=request.model_name,
        version=job.version or None,
        alias=job.alias,
    )


def _request(delivery_id: str, body: bytes) -> DeliveryRequest:
    # The common, valid deliveries are checked by hand (pydantic's models cost as much CPU
    # per delivery as the rest of the intake's own work); anything the quick check does not
    # accept outright goes through `parse_event`, which accepts or says precisely what is wrong.
    quick = quick_request(delivery_id, body)
    if quick is not None:
        return quick
    event = parse_event(body)
    if isinstance(event, ModelVersionCreated):
        return DeliveryRequest(delivery_id, JobKind.BUILD, event.data.name, event.data.version)
    if isinstance(event, AliasCreated):
        return DeliveryRequest(
            delivery_id, JobKind.ALIAS, event.data.name, event.data.version, event.data.alias
        )
    return DeliveryRequest(delivery_id, JobKind.UNALIAS, event.data.name, "", event.data.alias)


_VERSION = re.compile(r"[1-9][0-9]{0,17}")
_OPTIONAL_TEXT = (str, type(None))


def _text(value: object, longest: int) -> str | None:
    return value if type(value) is str and 0 < len(value) <= longest else None


def quick_request(delivery_id: str, body: bytes) -> DeliveryRequest | None:
    """The request `parse_event` would give for a plainly valid body; None if in any doubt.

    Accepts a subset of what `parse_event` accepts, with the same result (a property test
    holds the two together): exact `str` fields within the same length limits and version
    pattern; anything else (bad JSON, missing or odd fields, other events) returns None.
    """
    if may_be_deep(body):
        return None  # `parse_event` enforces the nesting limit (and survives the recursion)
    try:
        # Decoded here: MLflow sends UTF-8, and `json.loads` would first guess the encoding of
        # bytes; other encodings (and a BOM) fail here and take the full parser's way.
        raw = json.loads(body.decode())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None
    if type(raw) is not dict:
        return None
    data = raw.get("data")
    entity = raw.get("entity")
    action = raw.get("action")
    if type(data) is not dict or type(entity) is not str or type(action) is not str:
        return None
    name = _text(data.get("name"), 500)
    if name is None:
        return None
    if entity == "model_version" and action == "created":
        version = data.get("version")
        if (
            type(version) is str
            and _VERSION.fullmatch(version)
            # Optional fields `ModelVersionData` also types.
            and type(data.get("source")) in _OPTIONAL_TEXT
            and type(data.get("run_id")) in _OPTIONAL_TEXT
        ):
            return DeliveryRequest(delivery_id, JobKind.BUILD, name, version)
        return None
    if entity == "model_version_alias":
        alias = _text(data.get("alias"), 255)
        if alias is None:
            return None
        if action == "created":
            version = data.get("version")
            if type(version) is str and _VERSION.fullmatch(version):
                return DeliveryRequest(delivery_id, JobKind.ALIAS, name, version, alias)
            return None
        if action == "deleted":
            return DeliveryRequest(delivery_id, JobKind.UNALIAS, name, "", alias)
    return None


def _outcome_line(request: DeliveryRequest, job: Job, *, changed: bool) -> str:
    outcome = "queued" if changed else f"existing, {job.state}"
    return (
        f"delivery {request.delivery_id}: {request.kind} for '{request.model_name}' -> "
        f"{job.kind} job {job.id} ({outcome})"
    )
