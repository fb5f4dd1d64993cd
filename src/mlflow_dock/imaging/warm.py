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
* a model's big files (those with a layer of their own, keyed by that layer's digest, which
  depends on their bytes, path and mode only) are copied into a container at most once: one the
  container's image holds at the same path is linked to from the check (read-only root), any
  other is stored in the container's volume owned by root and read-only (no check can change
  what a later check of the same model reads) and linked to by the next versions that keep it;
  stored files no check refers to any more are removed. A version that keeps a gigabyte of
  weights is checked without copying them (about 3 s per GiB before);
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
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.imaging.dockerfile import MODEL_DIR, RUNTIME_UID
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
_FILES: Final = "files"  # under _VOLUME: big model files by layer digest, root's, read-only
# Run as root in the container (no capabilities needed: root owns the files and their directory).
_UNLINK: Final = "import os, sys\nfor p in sys.argv[1:]:\n    os.path.exists(p) and os.unlink(p)"

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
    # The model files with a layer of their own in the image it runs: path -> layer digest.
    image_files: Mapping[str, str] = field(default_factory=dict)
    # Layer digests of the files stored in its volume, and how many running checks use each.
    stored: set[str] = field(default_factory=set)
    in_use: Counter[str] = field(default_factory=Counter)
    # One check at a time writes into the volume: two storing one file would race.
    writing: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Placement:
    """Where a check finds each of the model's big files, and which it must copy first."""

    links: dict[str, str]  # path in the model -> where the container holds the file
    to_store: dict[str, str]  # path in the model -> layer digest: copied into the store now
    digests: frozenset[str] = frozenset()  # the stored files the check refers to


def place_files(
    files: Mapping[str, str], image_files: Mapping[str, str], stored: set[str]
) -> Placement:
    """Link each big file to the image's copy, else to the stored one, else store it (pure)."""
    links: dict[str, str] = {}
    to_store: dict[str, str] = {}
    used: set[str] = set()
    for path, digest in sorted(files.items()):
        if image_files.get(path) == digest:
            links[path] = f"{MODEL_DIR}/{path}"
            continue
        links[path] = _stored_path(digest)
        used.add(digest)
        if digest not in stored and digest not in to_store.values():
            to_store[path] = digest
    return Placement(links, to_store, frozenset(used))


def _stored_name(digest: str) -> str:
    return digest.replace(":", "-")  # a digest this service computed: "sha256:<hex>"


def _stored_path(digest: str) -> str:
    return f"{_VOLUME}/{_FILES}/{_stored_name(digest)}"


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
        files: Mapping[str, str] | None = None,
        image_files: Mapping[str, str] | None = None,
    ) -> None:
        """Load ``model_dir`` and score ``example`` in the warm container of this model.

        ``runtime`` (the runtime key) and ``repository`` (the target repository, i.e. the model)
        pick the container: versions of one model with one runtime share it, started from
        ``runtime_image`` the first time; no two models ever share one.

        ``runtime_image`` must be an image of that repository that already passed a full smoke
        test and differs from the image under test only in its model; raises PermanentError if
        the check fails. ``pull`` makes the engine have ``runtime_image``; called only to start
        a container. ``files``: the model's files with a layer of their own (path -> layer
        digest), copied in only if the container holds none of them; ``image_files``: those of
        ``runtime_image``.
        """
        started = time.monotonic()
        key = (runtime, repository)
        self._expire()
        entry = self._container(key, runtime_image, log, pull, image_files or {})
        container = entry.container
        relative = f"{_CHECKS}/{uuid.uuid4().hex}"
        check_dir = f"{_VOLUME}/{relative}"
        example_path = ""
        if example is not None:
            if not example.is_relative_to(model_dir):
                raise ValueError("the input example must be inside the model directory")
            example_path = f"{check_dir}/{example.relative_to(model_dir).as_posix()}"
        budget = max(self._limits.timeout_seconds - (time.monotonic() - started), 1.0)
        placement = Placement({}, {})
        try:
            with entry.writing:
                with self._lock:
                    placement = place_files(files or {}, entry.image_files, entry.stored)
                    entry.in_use.update(placement.digests)
                with _model_tar(model_dir, relative, placement) as archive:
                    container.put_archive(_VOLUME, archive)
                with self._lock:
                    entry.stored.update(placement.to_store.values())
            _log_placement(placement, files or {}, log)
            code, output = run_in_container(
                self._engine.client,
                container,
                ["python", "-c", _CLIENT, _SOCKET, check_dir, example_path, f"{budget:.1f}"],
            )
        except Exception as exc:
            # The warm container itself failed (gone, engine trouble): never reuse it.
            self._discard(key)
            raise RetryableError(f"warm smoke test could not run: {exc}") from exc
        finally:
            self._release(entry, placement)
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

    def prewarm(
        self,
        runtime: str,
        runtime_image: str,
        *,
        repository: str,
        image_files: Mapping[str, str] | None = None,
    ) -> None:
        """Start the warm container of this model and runtime in the background.

        Called once a runtime's first version in ``repository`` passed its full smoke test (the
        engine has the image), so the next version's check finds it warm. Failures are ignored:
        the check starts it again. ``image_files`` as for :meth:`check`.
        """

        def start() -> None:
            with contextlib.suppress(Exception):
                self._container(
                    (runtime, repository),
                    runtime_image,
                    lambda _line: None,
                    lambda: None,
                    image_files or {},
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
        self,
        key: tuple[str, str],
        image: str,
        log: LogSink,
        pull: Callable[[], None],
        image_files: Mapping[str, str],
    ) -> _Warm:
        with self._lock:
            entry = self._warm.get(key)
            if entry is not None:
                entry.last_used = time.monotonic()
                return entry
            starting = self._starting.setdefault(key, threading.Lock())
        with starting:
            with self._lock:
                entry = self._warm.get(key)
                if entry is not None:
                    return entry
            log(f"smoke test: starting a warm runtime from {image}")
            pull()
            container = self._start(image)
            entry = _Warm(container, time.monotonic(), image_files=dict(image_files))
            with self._lock:
                self._warm[key] = entry
                evicted = self._over_capacity()
            for old in evicted:
                _remove(old.container)
            return entry

    def _release(self, entry: _Warm, placement: Placement) -> None:
        """The check is over: remove stored files that no check refers to any more.

        Kept: those this check used (the next version most likely keeps them) and those a
        running check uses. A failed removal only leaves a file in a volume that goes with the
        container.
        """
        with self._lock:
            entry.in_use.subtract(placement.digests)
            stale = {
                digest
                for digest in entry.stored
                if digest not in placement.digests and entry.in_use[digest] <= 0
            }
            entry.stored -= stale
        if stale:
            with contextlib.suppress(Exception):
                entry.container.exec_run(
                    ["python", "-c", _UNLINK, *sorted(map(_stored_path, stale))], user="0"
                )

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


def _log_placement(placement: Placement, files: Mapping[str, str], log: LogSink) -> None:
    linked = [path for path in placement.links if path not in placement.to_store]
    if linked:
        log(
            f"smoke test: {len(linked)} of {len(files)} big model file(s) not copied, the warm "
            f"runtime holds them: {', '.join(sorted(linked)[:5])}"
        )


@contextlib.contextmanager
def _model_tar(model_dir: Path, target: str, placement: Placement) -> Iterator[IO[bytes]]:
    """``model_dir`` as a tar placing it at ``target``, readable by the image's user.

    Written to a temporary file and streamed from there to the engine: a model's weights may be
    gigabytes, and held in memory they made the service's peak RSS grow with the model.
    ``placement``: big files that become links, and those stored first.
    """
    with tempfile.TemporaryFile(prefix="mlflow-dock-warm-") as archive:
        _write_model_tar(archive, model_dir, target, placement)
        archive.seek(0)
        yield archive


def _write_model_tar(out: IO[bytes], model_dir: Path, target: str, placement: Placement) -> None:
    with tarfile.open(fileobj=out, mode="w") as tar:
        if placement.to_store:
            store = tarfile.TarInfo(_FILES)
            store.type = tarfile.DIRTYPE
            store.mode = 0o755  # root's: a check can neither add, replace nor remove a file
            tar.addfile(store)
            for path, digest in sorted(placement.to_store.items()):
                stored_as = f"{_FILES}/{_stored_name(digest)}"
                info = tar.gettarinfo(str(model_dir / path), arcname=stored_as)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o444
                with (model_dir / path).open("rb") as data:
                    tar.addfile(info, data)
        linked = {f"{target}/{path}" for path in placement.links}

        def owned(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            if info.name in linked:
                return None
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
        for path, location in sorted(placement.links.items()):
            link = tarfile.TarInfo(f"{target}/{path}")
            link.type = tarfile.SYMTYPE
            link.linkname = location
            link.uid = link.gid = RUNTIME_UID
            tar.addfile(link)
