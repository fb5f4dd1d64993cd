from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from mlflow_dock.intake.commit import GroupCommit


class Recorder:
    """A commit function that records its batches; `gate` holds the first commit open."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.committed: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: Sequence[int]) -> list[str]:
        self.gate.wait(5)
        if any(i < 0 for i in items):
            raise ValueError("negative")
        self.batches.append(list(items))
        self.committed.update(items)
        return [f"r{i}" for i in items]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_waiters_share_batches_and_each_gets_its_own_result():
    recorder = Recorder()
    group = GroupCommit(recorder)
    recorder.gate.clear()
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0.05)  # the first batch is now committing (held by the gate)
    rest = [asyncio.create_task(group.submit(i)) for i in range(1, 30)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in [first, *rest])  # nobody answered before the commit
    recorder.gate.set()
    results = await asyncio.gather(first, *rest)
    assert results == [f"r{i}" for i in range(30)]
    # Everything that queued during the first commit went in one second transaction.
    assert recorder.batches == [[0], list(range(1, 30))]


@pytest.mark.anyio
async def test_a_failing_item_fails_only_its_own_request():
    recorder = Recorder()
    group = GroupCommit(recorder)
    recorder.gate.clear()
    blocker = asyncio.create_task(group.submit(100))
    await asyncio.sleep(0.05)
    tasks = [asyncio.create_task(group.submit(i)) for i in (1, -1, 2)]
    await asyncio.sleep(0.01)
    recorder.gate.set()
    outcomes = await asyncio.gather(blocker, *tasks, return_exceptions=True)
    assert outcomes[0] == "r100" and outcomes[1] == "r1" and outcomes[3] == "r2"
    assert isinstance(outcomes[2], ValueError)
    assert recorder.committed == {100, 1, 2}


@pytest.mark.anyio
async def test_batches_are_capped():
    recorder = Recorder()
    group = GroupCommit(recorder, max_batch=4)
    recorder.gate.clear()
    tasks = [asyncio.create_task(group.submit(i)) for i in range(10)]
    await asyncio.sleep(0.05)
    recorder.gate.set()
    assert await asyncio.gather(*tasks) == [f"r{i}" for i in range(10)]
    assert all(len(b) <= 4 for b in recorder.batches)
    assert sorted(i for b in recorder.batches for i in b) == list(range(10))
