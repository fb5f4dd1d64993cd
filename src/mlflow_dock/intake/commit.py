"""Group commit: many concurrent requests share one store transaction, none answered early.

A request hands its item to `GroupCommit.submit` and waits. A writer thread commits batches:
while one batch is being committed, the next items queue up, and the writer takes all of them
as soon as the commit returns, without waiting for the event loop (which is busy reading the
next requests; at full rate a round trip through it took as long as the commit itself). Every
waiter is woken only after the transaction holding its item has committed, so a 202 still
means "durable". Under light load a batch is a single item and nothing waits longer than its
own commit. The writer thread runs only while there is something to commit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
        self._lock = threading.Lock()
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._writing = False
        # Keeps the running writer's task referenced (the loop holds tasks only weakly).
        self._writer: asyncio.Future[None] | None = None

    async def submit(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        with self._lock:
            self._pending.append((item, future))
            start = not self._writing
            self._writing = True
        if start:
            # No writer running: this request starts one, which keeps going until the queue
            # is empty (requests arriving meanwhile join the next batch).
            self._writer = asyncio.ensure_future(to_thread.run_sync(self._drain, loop))
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """The writer (a worker thread): commit batches until nothing is pending."""
        while True:
            with self._lock:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                if not batch:
                    self._writing = False
                    return
            try:
                outcomes = self._outcomes([item for item, _ in batch])
            except BaseException:
                # Not an error of the batch (the thread is being torn down): the next
                # request must still find no writer and start one.
                with self._lock:
                    self._pending[:0] = batch
                    self._writing = False
                raise
            try:
                # One wake-up of the loop per batch, not one per waiter.
                loop.call_soon_threadsafe(_settle, batch, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                with self._lock:
                    self._writing = False
                return

    def _outcomes(self, items: Sequence[In]) -> Sequence[Out | BaseException]:
        try:
            return self._commit(items)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
            logger.warning("a batch of %d failed (%s); one by one", len(items), exc)
        outcomes: list[Out | BaseException] = []
        for item in items:
            try:
                outcomes.append(self._commit([item])[0])
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


def _settle(
    batch: Sequence[tuple[object, asyncio.Future[Out]]], outcomes: Sequence[Out | BaseException]
) -> None:
    for (_, future), outcome in zip(batch, outcomes, strict=True):
        if future.done():  # the request was cancelled (client went away)
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
