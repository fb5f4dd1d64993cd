"""Smoke tests that cost about a second: new artifacts loaded in a warm, already-tested runtime.

A version assembled in the registry differs from the previous version's image only in its model
layer, and that image already passed a full smoke test. Starting a container of the new image
costs 6-13 s (interpreter start, imports, uvicorn, model load); almost none of it tests anything
new. So the previous image (by digest) is kept running as a *warm* container with MLflow already
imported, and each new version's artifacts are copied in and checked there:

* a warm loader (``_LOADER``) waits on a Unix socket inside the container; per check it forks,
  and the child loads the model with ``mlflow.pyfunc.load_model`` and scores the model's input
  example through the scoring server's own ``invocations``, as ``/invocations`` would; a fork per
  check means no check's state leaks into the next, and a crash kills only that child; the
  loader kills a check that overruns the deadline, with whatever processes it started;
* a warm container belongs to one model: it is keyed by (runtime key, target repository), so
  versions of different models never share a container, even with identical requirements;
* the model code is untrusted: the container is confined exactly like the full smoke test's
  (:func:`mlflow_dock.imaging.smoke.confinement`: no network, limits, read-only root, no
  capabilities, user 10001, none of the service's environment); artifacts arrive through the
  engine's archive API into a private anonymous volume (the root filesystem is read-only);
* containers carry :data:`~mlflow_dock.imaging.smoke.SMOKE_LABEL` and this process as
  :data:`~mlflow_dock.imaging.smoke.OWNER_LABEL`: a crashed owner's are removed by the next start
  (``SmokeTester.remove_leftovers``), a live neighbour's never; idle ones are removed after
  ``idle_seconds``, the least recently used beyond ``max_containers``, all of them on
  :meth:`WarmSmoke.close`.
"""

from __future__ import annotations

import contextlib
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.imaging.dockerfile import RUNTIME_UID
from mlflow_dock.imaging.engine import DockerEngine, engine_error
from mlflow_dock.imaging.smoke import (
    SmokeLimits,
    confinement,
    engine_cpus,
    last_json_line,
    run_in_container,
)
from mlflow_dock.jobs.model import LogSink

__all__ = ["WarmSmoke"]

WARM_LABEL: Final = "io.mlflow-dock.smoke-warm"
_SOCKET: Final = "/tmp/mlflow-dock-warm/loader.sock"  # noqa: S108 - inside the container
# An anonymous volume: the engine's archive API writes into volumes of a read-only container
# (Docker refuses tmpfs mounts there). Removed with the container.
_VOLUME: Final = "/mlflow-dock-checks"
_CHECKS: Final = "checks"  # under _VOLUME, writable by every check (sticky)

_LOADER: Final = r"""
import contextlib, json, os, select, shutil, signal, socket, sys, time
import mlflow.pyfunc
from mlflow.pyfunc import scoring_server
try:
    import pandas  # noqa: F401  (what most models load; imported once, here)
except ImportError:
    pass
# The image's own model, i.e. an earlier version of the very model whose versions this container
# checks (one container per model and runtime): loading it once here imports its flavor's
# libraries (sklearn, torch, ...) in the parent, so every forked check only deserialises the new
# artifacts. The parent thus holds that model's code; it is the same author's, and no other
# model's check ever forks from it.
try:
    mlflow.pyfunc.load_model(os.environ.get("__pyfunc_model_path__", "/opt/ml/model"))
except Exception as exc:
    print(f"warm: could not preload the image's model: {exc}", flush=True)
path, checks = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), exist_ok=True)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
print("warm: ready", flush=True)

def check(request, w):
    os.setsid()  # its own process group: whatever it starts is killed with it
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # over the memory limit, the kernel kills the check, not the loader
    try:
        model = mlflow.pyfunc.load_model(request["model"])
        result = {"ok": True, "detail": "model loaded"}
        if request.get("example"):
            with open(request["example"]) as f:
                data = f.read()
            answer = scoring_server.invocations(
                data, "application/json", model, model.metadata.get_input_schema()
            )
            result = {
                "ok": answer.status == 200,
                "detail": "/invocations answered %s: %s"
                % (answer.status, str(answer.response)[:300]),
            }
    except BaseException as exc:
        result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:800]}
    os.write(w, json.dumps(result).encode())
    os._exit(0)

def run(request):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        check(request, w)
    os.close(w)
    budget = float(request["budget"])
    end = time.monotonic() + budget
    out, timed_out = b"", False
    while True:
        left = end - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            timed_out = True
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    os.close(r)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(request["dir"], ignore_errors=True)
    if out:
        return out.decode()
    if timed_out:
        detail = f"no answer within {budget:.0f} s"
        return json.dumps({"ok": False, "timeout": True, "detail": detail})
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    detail = "the check was killed (SIGKILL)" if killed else "the check process died"
    return json.dumps({"ok": False, "killed": killed, "detail": detail})

while True:
    conn, _ = server.accept()
    try:
        request = json.loads(conn.makefile().readline())
        if not os.path.realpath(request["dir"]).startswith(checks + "/"):
            raise ValueError("check directory outside the checks volume")
        answer = run(request)
    except Exception as exc:
        answer = json.dumps({"ok": False, "detail": f"warm loader: {type(exc).__name__}: {exc}"})
    with contextlib.suppress(OSError):
        conn.sendall(answer.encode() + b"\n")
    conn.close()
"""

# Asks the loader for one check; prints "." every few seconds while it waits (the engine's exec
# stream must not look idle), then the loader's one-line JSON answer.
_CLIENT: Final = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
request = {"model": sys.argv[2], "dir": sys.argv[2], "example": sys.argv[3], "budget": sys.argv[4]}
s.sendall(json.dumps(request).encode() + b"\n")
s.settimeout(5)
data = b""
while not data.endswith(b"\n"):
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        print(".", flush=True)
        continue
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
"""


@dataclass
class _Warm:
    container: Any
    last_used: float


class WarmSmoke:
    """One warm container per model and runtime: ``(runtime key, target repository)``."""

    def __init__(
        self,
        engine: DockerEngine,
        *,
        limits: SmokeLimits,
        idle_seconds: float = 900.0,
        max_containers: int = 8,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._idle = idle_seconds
        self._max = max_containers
        self._lock = threading.Lock()
        self._warm: dict[tuple[str, str], _Warm] = {}
        self._starting: dict[tuple[str, str], threading.Lock] = {}

    def check(
        self,
        runtime: str,
        runtime_image: str,
        model_dir: Path,
        example: Path | None,
        log: LogSink,
        *,
        repository: str,
        pull: Callable[[], None] = lambda: None,
    ) -> None:
        """Load ``model_dir`` and score ``example`` in the warm container of this model.

        ``runtime`` (the runtime key) and ``repository`` (the target repository, i.e. the model)
        pick the container: versions of one model with one runtime share it, started from
        ``runtime_image`` the first time; no two models ever share one.

        ``runtime_image`` must be an image of that repository that already passed a full smoke
        test and differs from the image under test only in its model; raises PermanentError if
        the check fails. ``pull`` makes the engine have ``runtime_image``; called only to start
        a container.
        """
        started = time.monotonic()
        key = (runtime, repository)
        self._expire()
        container = self._container(key, runtime_image, log, pull)
        relative = f"{_CHECKS}/{uuid.uuid4().hex}"
        check_dir = f"{_VOLUME}/{relative}"
        example_path = ""
        if example is not None:
            if not example.is_relative_to(model_dir):
                raise ValueError("the input example must be inside the model directory")
            example_path = f"{check_dir}/{example.relative_to(model_dir).as_posix()}"
        budget = max(self._limits.timeout_seconds - (time.monotonic() - started), 1.0)
        try:
            with _model_tar(model_dir, relative) as archive:
                container.put_archive(_VOLUME, archive)
            code, output = run_in_container(
                self._engine.client,
                container,
                ["python", "-c", _CLIENT, _SOCKET, check_dir, example_path, f"{budget:.1f}"],
            )
        except Exception as exc:
            # The warm container itself failed (gone, engine trouble): never reuse it.
            self._discard(key)
            raise RetryableError(f"warm smoke test could not run: {exc}") from exc
        result = last_json_line(output)
        if code != 0 or not result:
            self._discard(key)
            raise RetryableError(
                f"warm smoke test: no answer from the warm runtime: {output.strip()[-300:]}"
            )
        if not result.get("ok"):
            detail = result.get("detail")
            if result.get("killed"):
                detail = (
                    f"{detail}: the model most likely exceeded the memory limit "
                    f"({self._limits.memory_text}, MLFLOW_DOCK_SMOKE_MEMORY)"
                )
            elif result.get("timeout"):
                detail = f"{detail} (MLFLOW_DOCK_SMOKE_TIMEOUT_SECONDS)"
            raise PermanentError(f"smoke test (warm runtime): {detail}")
        log(
            f"smoke test passed in a warm runtime ({time.monotonic() - started:.1f}s): "
            f"{result.get('detail')}"
        )

    def prewarm(self, runtime: str, runtime_image: str, *, repository: str) -> None:
        """Start the warm container of this model and runtime in the background.

        Called once a runtime's first version in ``repository`` passed its full smoke test (the
        engine has the image), so the next version's check finds it warm. Failures are ignored:
        the check starts it again.
        """

        def start() -> None:
            with contextlib.suppress(Exception):
                self._container(
                    (runtime, repository), runtime_image, lambda _line: None, lambda: None
                )

        threading.Thread(target=start, name="warm-smoke-prewarm", daemon=True).start()

    def close(self) -> None:
        """Remove every warm container this instance started."""
        with self._lock:
            warm, self._warm = self._warm, {}
        for entry in warm.values():
            _remove(entry.container)

    # -- containers -----------------------------------------------------------------------

    def _container(
        self, key: tuple[str, str], image: str, log: LogSink, pull: Callable[[], None]
    ) -> Any:
        with self._lock:
            entry = self._warm.get(key)
            if entry is not None:
                entry.last_used = time.monotonic()
                return entry.container
            starting = self._starting.setdefault(key, threading.Lock())
        with starting:
            with self._lock:
                entry = self._warm.get(key)
                if entry is not None:
                    return entry.container
            log(f"smoke test: starting a warm runtime from {image}")
            pull()
            container = self._start(image)
            with self._lock:
                self._warm[key] = _Warm(container, time.monotonic())
                evicted = self._over_capacity()
            for old in evicted:
                _remove(old.container)
            return container

    def _over_capacity(self) -> list[_Warm]:
        """Take the least recently used containers beyond ``max_containers`` (lock held)."""
        evicted = []
        while len(self._warm) > self._max:
            oldest = min(self._warm, key=lambda k: self._warm[k].last_used)
            evicted.append(self._warm.pop(oldest))
        return evicted

    def _start(self, image: str) -> Any:
        from docker.types import Mount

        client = self._engine.client
        try:
            options = confinement(self._limits, cpus_available=engine_cpus(client))
            # Checks fork the loader; BLAS thread pools do not survive a fork everywhere.
            options["environment"].update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
            options["labels"][WARM_LABEL] = "1"
            container = client.containers.run(
                image,
                command=["python", "-c", _LOADER, _SOCKET, f"{_VOLUME}/{_CHECKS}"],
                name=f"mlflow-dock-warm-{uuid.uuid4().hex[:12]}",
                detach=True,
                mounts=[Mount(target=_VOLUME, source=None, type="volume")],
                **options,
            )
        except Exception as exc:
            raise engine_error(exc, f"starting a warm smoke-test runtime from {image}") from exc
        deadline = time.monotonic() + self._limits.timeout_seconds
        try:
            while time.monotonic() < deadline:
                container.reload()
                if container.status in ("exited", "dead"):
                    raise PermanentError(
                        "smoke test: the warm runtime exited: "
                        + container.logs(tail=5).decode("utf-8", "replace")[-600:]
                    )
                if b"warm: ready" in container.logs(tail=5):
                    return container
                time.sleep(0.1)
            raise RetryableError(
                f"smoke test: warm runtime not ready in {self._limits.timeout_seconds:.0f} s"
            )
        except BaseException:
            _remove(container)
            raise

    def _discard(self, key: tuple[str, str]) -> None:
        with self._lock:
            entry = self._warm.pop(key, None)
        if entry is not None:
            _remove(entry.container)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [key for key, e in self._warm.items() if now - e.last_used > self._idle]
        for key in idle:
            self._discard(key)


def _remove(container: Any) -> None:
    # v=True: the anonymous checks volume goes with it.
    with contextlib.suppress(Exception):
        container.remove(force=True, v=True)


@contextlib.contextmanager
def _model_tar(model_dir: Path, target: str) -> Iterator[IO[bytes]]:
    """``model_dir`` as a tar placing it at ``target``, readable by the image's user.

    Written to a temporary file and streamed from there to the engine: a model's weights may be
    gigabytes, and held in memory they made the service's peak RSS grow with the model.
    """
    with tempfile.TemporaryFile(prefix="mlflow-dock-warm-") as archive:
        _write_model_tar(archive, model_dir, target)
        archive.seek(0)
        yield archive


def _write_model_tar(out: IO[bytes], model_dir: Path, target: str) -> None:
    with tarfile.open(fileobj=out, mode="w") as tar:

        def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = RUNTIME_UID
            info.uname = info.gname = ""
            info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
            return info

        parts = target.split("/")
        for depth in range(1, len(parts)):  # the checks directory itself
            parent = tarfile.TarInfo("/".join(parts[:depth]))
            parent.type = tarfile.DIRTYPE
            # The checks directory is shared by concurrent checks of one container.
            parent.mode = 0o1777
            tar.addfile(parent)
        tar.add(model_dir, arcname=target, filter=owned)
