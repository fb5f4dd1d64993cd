"""The smoke test as one policy applied to any candidate, whichever strategy made it.

Nothing is published until the candidate passed: a full run of the image (``smoke.py``), or, for
an image that differs from an already-tested one only in its model layer, a check of the new
artifacts in a warm container of the tested image (``warm.py``, about a second).
"""

from __future__ import annotations

from typing import Protocol

from mlflow_dock.imaging.builder import BuildRequest, Candidate, LocalImage
from mlflow_dock.imaging.engine import EngineTransfers
from mlflow_dock.imaging.smoke import SmokeTester
from mlflow_dock.imaging.warm import WarmSmoke

__all__ = ["UNTESTED_NOTE", "NoSmokeTest", "SmokePolicy", "SmokeTest"]

UNTESTED_NOTE = "published untested: no Docker Engine or Podman for the smoke test"


class SmokePolicy(Protocol):
    def check(self, candidate: Candidate, request: BuildRequest) -> str | None:
        """Raise if the candidate must not be published; a returned note goes on the job."""
        ...


class NoSmokeTest:
    """MLFLOW_DOCK_SMOKE_TEST=false."""

    def check(self, candidate: Candidate, request: BuildRequest) -> str | None:
        return None


class SmokeTest:
    def __init__(
        self,
        *,
        full: SmokeTester,
        warm: WarmSmoke,
        engine: EngineTransfers,
        untested_without_engine: bool,
    ) -> None:
        self._full = full
        self._warm = warm
        self._engine = engine
        # The engine-free builder publishes without an engine to test on (saying so); the
        # engine builders cannot have built anything without one.
        self._untested_without_engine = untested_without_engine

    def check(self, candidate: Candidate, request: BuildRequest) -> str | None:
        if self._untested_without_engine and not self._engine.reachable():
            request.log(UNTESTED_NOTE)
            return UNTESTED_NOTE
        request.step("smoke")
        target, key = request.target, request.runtime_key
        if isinstance(candidate, LocalImage):
            self._full.check(candidate.reference, request.example, request.log)
            if candidate.shares_runtime:
                # The next version of this runtime will be checked warm; get it warm now.
                self._warm.prewarm(key, candidate.reference, repository=target.repository)
            return None
        if candidate.tested_on is not None:
            # Only the model layer differs from that image, which passed its smoke test: load
            # the new artifacts in a warm container of it (this model's own: warm.py).
            tested = candidate.tested_on
            self._warm.check(
                key,
                str(target.with_digest(tested)),
                request.package.path,
                request.example,
                request.log,
                repository=target.repository,
                pull=lambda: self._engine.pull(target.repository, tested),
                files=candidate.model_files,
                image_files=candidate.tested_on_files,
            )
            return None
        # Stored untagged: nothing is published until the smoke test passes.
        staged = str(target.with_digest(candidate.digest))
        self._engine.pull(target.repository, candidate.digest)
        self._full.check(staged, request.example, request.log)
        self._warm.prewarm(
            key, staged, repository=target.repository, image_files=candidate.model_files
        )
        return None
