"""Group commit: many concurrent requests share one store transaction, none answered early.

A request hands its item to `GroupCommit.submit` and waits. While one batch is being committed
(in a worker thread, so the event loop keeps reading requests), the next items queue up; the
next batch takes all of them. Every waiter is woken only after the transaction holding its item
has committed, so a 202 still means "durable". Under light load a batch is a single item and
nothing waits longer than its own commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from anyio import to_thread

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

DEFAULT_MAX_BATCH = 256


class GroupCommit(Generic[In, Out]):
    """Runs `commit(batch) -> results` (same length, same order) for items from one event loop.

    If a whole batch fails, each of its items is committed alone, so one bad item (or a unique
    key race with another replica) fails only its own request.
    """

    def __init__(
        self, commit: Callable[[Sequence[In]], list[Out]], *, max_batch: int = DEFAULT_MAX_BATCH
    ) -> None:
        self._commit = commit
        self._max_batch = max_batch
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            # No batch in flight: this request starts the flusher, which keeps going until the
            # queue is empty (requests arriving meanwhile join the next batch).
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            items = [item for item, _ in batch]
            try:
                results = await to_thread.run_sync(self._commit, items)
                outcomes: list[Out | BaseException] = list(results)
            except Exception as exc:
                if len(items) == 1:
                    outcomes = [exc]
                else:
                    logger.warning("a batch of %d failed (%s); one by one", len(items), exc)
                    outcomes = await to_thread.run_sync(self._one_by_one, items)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the request was cancelled (client went away)
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _one_by_one(self, items: Sequence[In]) -> list[Out | BaseException]:
        outcomes: list[Out | BaseException] = []
        for item in items:
            try:
                outcomes.append(self._commit([item])[0])
            except Exception as exc:
                outcomes.append(exc)
        return outcomes
