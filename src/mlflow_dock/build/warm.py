"""Smoke tests that cost about a second: new artifacts loaded in a warm, already-tested runtime.

A version assembled in the registry differs from the previous version's image only in its model
layer, and that image already passed a full smoke test. Starting a container of the new image
costs 6-13 s (interpreter start, imports, uvicorn, model load); almost none of it tests anything
new. So the runtime (the previous image, by digest) is kept running as a *warm* container with
MLflow already imported, and each new version's artifacts are copied in and checked there:

* a warm loader (``_LOADER``) waits on a Unix socket inside the container; per check it forks,
  and the child loads the model with ``mlflow.pyfunc.load_model`` and scores the model's input
  example through the scoring server's own ``invocations``, as ``/invocations`` would; a fork per
  check means no model's state leaks into the next, and a crash kills only that child;
* the model code is untrusted: the container has no network (``network_mode=none``), memory,
  CPU and pids limits, no capabilities, ``no-new-privileges``, runs as the image's user 10001
  and gets none of the service's environment (no registry or webhook credentials);
* containers carry :data:`~mlflow_dock.build.smoke.SMOKE_LABEL` and this process as
  :data:`~mlflow_dock.build.smoke.OWNER_LABEL`: a crashed owner's are removed by the next start
  (``SmokeTester.remove_leftovers``), a live neighbour's never; idle ones are removed after
  ``idle_seconds``, all of them on :meth:`WarmSmoke.close`.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mlflow_dock.build.engine import DockerEngine
from mlflow_dock.build.smoke import OWNER_LABEL, SMOKE_LABEL, _this_process
from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.jobs.model import LogSink

__all__ = ["WarmLimits", "WarmSmoke"]

WARM_LABEL: Final = "io.mlflow-dock.smoke-warm"
_SOCKET: Final = "/tmp/mlflow-dock-warm/loader.sock"  # noqa: S108 - inside the container
_TMP: Final = "/tmp"  # noqa: S108 - inside the container
_CHECKS: Final = "mlflow-dock-checks"  # under _TMP

_LOADER: Final = r"""
import json, os, socket, sys
import mlflow.pyfunc
from mlflow.pyfunc import scoring_server
try:
    import pandas  # noqa: F401  (what most models load; imported once, here)
except ImportError:
    pass
# The image's own model (the previous version, same runtime): loading it once here imports
# its flavor's libraries (sklearn, torch, ...) in the parent, so every forked check starts
# with them imported and only deserialises the new artifacts.
try:
    mlflow.pyfunc.load_model(os.environ.get("__pyfunc_model_path__", "/opt/ml/model"))
except Exception as exc:
    print(f"warm: could not preload the image's model: {exc}", flush=True)
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
print("warm: ready", flush=True)
while True:
    conn, _ = server.accept()
    request = json.loads(conn.makefile().readline())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
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
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    if not out:
        out = json.dumps({"ok": False, "detail": "the check process died (memory limit?)"})
    conn.sendall(out.encode() + b"\n")
    conn.close()
"""

_CLIENT: Final = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(float(sys.argv[4]))
s.connect(sys.argv[1])
s.sendall(json.dumps({"model": sys.argv[2], "example": sys.argv[3]}).encode() + b"\n")
print(s.makefile().readline().strip())
"""


@dataclass(frozen=True)
class WarmLimits:
    memory: str = "2g"
    cpus: float = 1.0
    pids: int = 256


@dataclass
class _Warm:
    container: Any
    last_used: float


class WarmSmoke:
    """One warm container per tested runtime image (``repository@digest``), shared by checks."""

    def __init__(
        self,
        engine: DockerEngine,
        *,
        limits: WarmLimits | None = None,
        start_timeout: float = 300.0,
        check_timeout: float = 120.0,
        idle_seconds: float = 900.0,
    ) -> None:
        self._engine = engine
        self._limits = limits or WarmLimits()
        self._start_timeout = start_timeout
        self._check_timeout = check_timeout
        self._idle = idle_seconds
        self._lock = threading.Lock()
        self._warm: dict[str, _Warm] = {}
        self._starting: dict[str, threading.Lock] = {}

    def check(
        self,
        runtime: str,
        runtime_image: str,
        model_dir: Path,
        example: Path | None,
        log: LogSink,
        *,
        pull: Callable[[], None] = lambda: None,
    ) -> None:
        """Load ``model_dir`` and score ``example`` in a warm container of runtime ``runtime``.

        ``runtime`` identifies everything but the model (the runtime key): versions of any model
        with the same key share one warm container, started from ``runtime_image`` the first
        time.

        ``runtime_image`` must be an image that already passed a full smoke test and differs
        from the image under test only in its model; raises PermanentError if the check fails.
        ``pull`` makes the engine have ``runtime_image``; called only to start a container.
        """
        started = time.monotonic()
        self._expire()
        container = self._container(runtime, runtime_image, log, pull)
        relative = f"{_CHECKS}/{uuid.uuid4().hex}"
        check_dir = f"{_TMP}/{relative}"
        try:
            container.put_archive(_TMP, _model_tar(model_dir, relative))
            example_path = (
                f"{check_dir}/{example.relative_to(model_dir).as_posix()}"
                if example is not None and example.is_relative_to(model_dir)
                else ""
            )
            if example is not None and not example_path:
                raise ValueError("the input example must be inside the model directory")
            code, output = container.exec_run(
                [
                    "python",
                    "-c",
                    _CLIENT,
                    _SOCKET,
                    check_dir,
                    example_path,
                    str(self._check_timeout),
                ]
            )
        except PermanentError:
            raise
        except Exception as exc:
            # The warm container itself failed (gone, engine trouble): never reuse it.
            self._discard(runtime)
            raise RetryableError(f"warm smoke test could not run: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                container.exec_run(["rm", "-rf", check_dir], detach=True)
        text = output.decode("utf-8", "replace").strip().splitlines()
        try:
            result = json.loads(text[-1]) if text else {}
        except ValueError:
            result = {}
        if code != 0 or not result:
            self._discard(runtime)
            raise RetryableError(f"warm smoke test: no answer from the warm runtime: {text[-3:]}")
        if not result.get("ok"):
            raise PermanentError(f"smoke test (warm runtime): {result.get('detail')}")
        log(
            f"smoke test passed in a warm runtime ({time.monotonic() - started:.1f}s): "
            f"{result.get('detail')}"
        )

    def prewarm(self, runtime: str, runtime_image: str) -> None:
        """Start the warm container for ``runtime`` in the background (the engine has the image).

        Called once a runtime's first version passed its full smoke test, so the next version's
        check finds the runtime warm. Failures are ignored: the check starts it again.
        """

        def start() -> None:
            with contextlib.suppress(Exception):
                self._container(runtime, runtime_image, lambda _line: None, lambda: None)

        threading.Thread(target=start, name="warm-smoke-prewarm", daemon=True).start()

    def close(self) -> None:
        """Remove every warm container this instance started."""
        with self._lock:
            warm, self._warm = self._warm, {}
        for entry in warm.values():
            with contextlib.suppress(Exception):
                entry.container.remove(force=True)

    # -- containers -----------------------------------------------------------------------

    def _container(self, key: str, image: str, log: LogSink, pull: Callable[[], None]) -> Any:
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
            return container

    def _start(self, image: str) -> Any:
        limits = self._limits
        container = self._engine.client.containers.run(
            image,
            command=["python", "-c", _LOADER, _SOCKET],
            name=f"mlflow-dock-warm-{uuid.uuid4().hex[:12]}",
            detach=True,
            # Untrusted model code: no network, no capabilities, bounded memory/CPU/processes,
            # and only the image's own environment (none of the service's credentials).
            network_mode="none",
            mem_limit=limits.memory,
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            labels={SMOKE_LABEL: "1", WARM_LABEL: "1", OWNER_LABEL: _this_process()},
            # Checks fork the loader; BLAS thread pools do not survive a fork everywhere.
            environment={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + self._start_timeout
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
            raise RetryableError(f"smoke test: warm runtime not ready in {self._start_timeout}s")
        except BaseException:
            with contextlib.suppress(Exception):
                container.remove(force=True)
            raise

    def _discard(self, key: str) -> None:
        with self._lock:
            entry = self._warm.pop(key, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                entry.container.remove(force=True)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [image for image, e in self._warm.items() if now - e.last_used > self._idle]
        for image in idle:
            self._discard(image)


def _model_tar(model_dir: Path, target: str) -> bytes:
    """``model_dir`` as a tar placing it at ``target``, readable by the image's user."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 10001
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
    return buffer.getvalue()
