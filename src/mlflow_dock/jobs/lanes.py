"""Lanes: one worker pool per lane in a process, each claiming only its lane's kinds of job.

A build takes minutes; an alias or unalias job moves one tag in the registry. In one pool, an
alias set while builds were queued waited for all of them (4.8 s behind one build attaching
its SBOM, issue 17). With lanes, the alias lane's threads claim only alias and unalias jobs and
the build lane's only builds, so an alias waits for nothing but its own version's build.

Waking: a build finished in this process wakes the alias lane at once (`Lanes` is told by the
build lane). A build finished in another process (a Celery worker, another `serve` on the same
store) has no way to reach this process's threads; the alias lane polls the store every
`ALIAS_POLL_SECONDS` instead, a read of a few indexed rows that takes no write lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mlflow_dock.jobs.model import LANE_KINDS, Job, JobKind, Lane
from mlflow_dock.jobs.worker import WorkerPool

# A build finished by another process reaches a waiting alias within this (plus the tag).
# Measured: one poll reads ~0.2 ms on SQLite (see docs/benchmarks.md, "Alias lane").
ALIAS_POLL_SECONDS = 0.2
# Builds are woken by the intake in this process; the poll finds work queued elsewhere.
BUILD_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class LanePlan:
    """One pool a process runs: which lane, which kinds of job it claims, how many threads."""

    lane: Lane
    kinds: frozenset[JobKind]
    concurrency: int
    poll_seconds: float


def plan_lanes(*, build_concurrency: int, alias_concurrency: int) -> tuple[LanePlan, ...]:
    """The pools for these sizes; a size of 0 runs no pool for that lane.

    `alias_concurrency` 0: no alias lane, and the build pool (if any) runs alias jobs too, in
    arrival order with builds, as before lanes existed.
    """
    if alias_concurrency <= 0:
        if build_concurrency <= 0:
            return ()
        return (LanePlan(Lane.BUILD, frozenset(JobKind), build_concurrency, BUILD_POLL_SECONDS),)
    alias = LanePlan(Lane.ALIAS, LANE_KINDS[Lane.ALIAS], alias_concurrency, ALIAS_POLL_SECONDS)
    if build_concurrency <= 0:
        return (alias,)
    build = LanePlan(Lane.BUILD, LANE_KINDS[Lane.BUILD], build_concurrency, BUILD_POLL_SECONDS)
    return (build, alias)


# Makes the pool for a plan; the callable it is given must hear of every job the pool ran.
PoolFactory = Callable[[LanePlan, Callable[[Job], None]], WorkerPool]


class Lanes:
    """This process's pools, by lane. Empty when the process runs no jobs (an API replica)."""

    def __init__(self, plans: Iterable[LanePlan], make_pool: PoolFactory) -> None:
        self._pools: dict[Lane, WorkerPool] = {
            plan.lane: make_pool(plan, self._finished) for plan in plans
        }

    @property
    def pools(self) -> Mapping[Lane, WorkerPool]:
        return self._pools

    @property
    def kinds(self) -> frozenset[JobKind]:
        """The kinds of job some pool of this process claims."""
        return frozenset().union(*(pool.kinds for pool in self._pools.values()))

    def runs(self, kind: JobKind) -> bool:
        return kind in self.kinds

    def notify(self, kind: JobKind) -> None:
        """A job of `kind` was queued: wake the pool that claims it."""
        for pool in self._pools.values():
            if kind in pool.kinds:
                pool.notify()

    def start(self) -> None:
        for pool in self._pools.values():
            pool.start()

    def stop(self, timeout: float = 10.0) -> None:
        for pool in self._pools.values():
            pool.stop(timeout)

    def _finished(self, job: Job) -> None:
        if job.kind is not JobKind.BUILD:
            return
        # Alias jobs waiting for this build may run now; a pool that also builds woke itself.
        for pool in self._pools.values():
            if JobKind.BUILD not in pool.kinds and pool.kinds & LANE_KINDS[Lane.ALIAS]:
                pool.notify()
