"""Smoke test of a built image before anything is pushed: it must answer /ping, and its
logged serving input example (if any) must get a 200 from /invocations.

The image runs the model's own code (``load_context``, unpickling), and the model's author is not
trusted, so every smoke-test container (this full test and the warm one, warm.py) is confined
the same way (:func:`confinement`):

* no network at all (``network_mode=none``): only its own loopback, so no route to the host or
  its loopback, the service's databases and broker, the cloud metadata service or the internet.
  The service therefore cannot reach the server from outside; a small probe (``_PROBE``, the
  standard library only) runs inside it with ``exec`` under the image's own interpreter, polls
  ``127.0.0.1:8080/ping``, posts the input example and prints one JSON line;
* memory (no swap on top), CPU and process limits (:class:`SmokeLimits`,
  ``MLFLOW_DOCK_SMOKE_*``); the kernel's OOM kill of a model that loads too much is reported as
  such, not as a crash;
* a read-only root filesystem; empty tmpfs mounts where a server writes: ``/tmp`` (also
  ``$HOME`` here) and nginx's log and temp directories, which MLflow's stock image needs. The
  runtime gives a tmpfs over an existing directory that directory's mode, so those must be
  writable for user 10001 in the image (stock.py makes nginx's so);
* every capability dropped, ``no-new-privileges``, user 10001 (the images' user; MLflow's stock
  image would run as root), none of the service's environment;
* one deadline for start, ``/ping`` and the example (``MLFLOW_DOCK_SMOKE_TIMEOUT_SECONDS``);
  the container is removed however the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.imaging.dockerfile import MODEL_DIR, RUNTIME_UID, SERVING_PORT
from mlflow_dock.imaging.engine import DockerEngine, engine_error
from mlflow_dock.jobs.model import LogSink

__all__ = [
    "OWNER_LABEL",
    "SMOKE_LABEL",
    "SmokeLimits",
    "SmokeTester",
    "confinement",
    "owner_of",
    "run_in_container",
]

SMOKE_LABEL: Final = "io.mlflow-dock.smoke-test"
# Which process started a smoke container: "<hostname>:<pid namespace>:<pid>" (owner_of).
# Several services (or a test suite beside a running service) may share one engine; only a dead
# owner's containers are leftovers, a live neighbour's are its own business.
OWNER_LABEL: Final = "io.mlflow-dock.smoke-owner"

# Writable, empty and private to the container. nginx's directories are for MLflow's stock image
# (MLFLOW_DOCK_BUILDER=mlflow), whose entrypoint links its logs there and whose nginx keeps
# request bodies there; elsewhere they are unused empty mounts.
_TMPFS_PATHS: Final = ("/tmp", "/var/log/nginx", "/var/lib/nginx")  # noqa: S108 - in the container
_TMPFS_OPTIONS: Final = "rw,nosuid,nodev,mode=1777"
# How long a probe that died without an answer waits for the engine to report the container's
# exit (an OOM kill is reported a moment after the exec's stream ends).
EXIT_GRACE_SECONDS: Final = 10.0


@dataclass(frozen=True)
class SmokeLimits:
    """What one smoke-test container may use (full and warm alike), from MLFLOW_DOCK_SMOKE_*.

    4 GiB holds a typical scikit-learn, LightGBM or XGBoost model with MLflow's server; a model
    that needs more fails its smoke test with a reason naming the setting.
    """

    memory_bytes: int = 4 * 1024**3
    # 2, not 1: loading a model on one CPU made the confined full smoke test 11 % slower than
    # the unconfined one (bench/smoke_confinement.py), on two 2 %.
    cpus: float = 2.0
    pids: int = 512
    timeout_seconds: float = 120.0

    @property
    def memory_text(self) -> str:
        return f"{self.memory_bytes / 1024**2:.0f} MiB"


def engine_cpus(client: Any) -> int | None:
    """The engine's CPU count, or None where it does not say."""
    try:
        return int(client.info()["NCPU"])
    except Exception:  # any engine that will not say keeps the limit as set
        return None


def confinement(limits: SmokeLimits, *, cpus_available: int | None = None) -> dict[str, Any]:
    """``containers.run`` options for a container that runs untrusted model code.

    The CPU limit is lowered to ``cpus_available`` (the engine's CPUs): Docker refuses a
    container asking for more CPUs than the machine has.
    """
    cpus = limits.cpus if not cpus_available else min(limits.cpus, float(cpus_available))
    # $HOME on /tmp: the images' own home (/home/mlflow; none in MLflow's stock image) is on the
    # read-only root, and a tmpfs over it would keep its mode but not its owner.
    environment = {"HOME": "/tmp"}  # noqa: S108 - inside the container
    return {
        "network_mode": "none",
        "mem_limit": limits.memory_bytes,
        # Equal to the memory limit: no swap on top of it.
        "memswap_limit": limits.memory_bytes,
        "nano_cpus": int(cpus * 1e9),
        "pids_limit": limits.pids,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "user": f"{RUNTIME_UID}:{RUNTIME_UID}",
        "read_only": True,
        "tmpfs": dict.fromkeys(_TMPFS_PATHS, _TMPFS_OPTIONS),
        "environment": environment,
        "labels": {SMOKE_LABEL: "1", OWNER_LABEL: _this_process()},
    }


# Runs inside the container under the image's interpreter, with `-I -S` (no site-packages: the
# standard library only, nothing the model installed runs). Prints "." every few seconds so the
# engine's exec stream never looks idle, then exactly one JSON line; its own timer enforces the
# deadline even if the server accepts a connection and never answers.
_PROBE: Final = r"""
import http.client, json, signal, sys, threading, time
port, budget, example = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
stage = "ping"
def done(**result):
    print(json.dumps(result), flush=True)
    raise SystemExit(0)
def out_of_time(*_):
    done(state="timeout", stage=stage)
signal.signal(signal.SIGALRM, out_of_time)
signal.setitimer(signal.ITIMER_REAL, max(budget, 0.1))
def beat():
    while True:
        time.sleep(5)
        print(".", flush=True)
threading.Thread(target=beat, daemon=True).start()
def call(method, path, body=None, timeout=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(2000)
    finally:
        conn.close()
while True:
    try:
        if call("GET", "/ping", timeout=2)[0] == 200:
            break
    except (OSError, http.client.HTTPException):
        pass
    time.sleep(0.2)
if not example:
    done(state="answered", status=200, body="")
stage = "invocations"
with open(example, "rb") as f:
    data = f.read()
try:
    status, body = call("POST", "/invocations", data)
except (OSError, http.client.HTTPException) as exc:
    done(state="error", detail=f"{type(exc).__name__}: {exc}")
done(state="answered", status=status, body=body.decode("utf-8", "replace"))
"""


def _pid_namespace() -> str:
    """This process's PID namespace (its inode), or "" where the kernel does not say."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def owner_of(pid: int) -> str:
    """The :data:`OWNER_LABEL` of containers started by process ``pid`` of this PID namespace.

    Host name, PID namespace and PID: a service in a container on the host's network has the
    host's name but its own PIDs, and must not read a live host process's PID as a dead one of
    its own (it removed a neighbour's running smoke tests so).
    """
    return f"{socket.gethostname()}:{_pid_namespace()}:{pid}"


def _this_process() -> str:
    return owner_of(os.getpid())


def _owner_is_gone(owner: str) -> bool:
    host, namespace, pid = [*owner.split(":"), "", ""][:3]
    if (host, namespace) != (socket.gethostname(), _pid_namespace()) or not pid.isdigit():
        # Another machine's or another PID namespace's process (an engine shared over
        # DOCKER_HOST or a socket), or a label without a namespace: we cannot tell.
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def run_in_container(client: Any, container: Any, command: list[str]) -> tuple[int | None, str]:
    """Run ``command`` in the running ``container``; its exit code (None: unknown) and output.

    Streamed rather than ``exec_run``: a blocking exec is cut off by the SDK's read timeout (60 s),
    while a command that prints something every few seconds may take as long as it needs.
    """
    exec_id = client.api.exec_create(container.id, command)["Id"]
    chunks: Iterator[bytes] = client.api.exec_start(exec_id, stream=True)
    output = b"".join(chunks).decode("utf-8", "replace")
    code = client.api.exec_inspect(exec_id).get("ExitCode")
    return (int(code) if code is not None else None), output


def last_json_line(output: str) -> dict[str, Any]:
    """The JSON object a probe printed last, or {} if it printed none."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return {}


class SmokeTester:
    def __init__(self, engine: DockerEngine, *, limits: SmokeLimits) -> None:
        self._engine = engine
        self._limits = limits

    def remove_leftovers(self) -> int:
        """Remove smoke-test containers a killed process left running; returns how many."""
        client = self._engine.client
        leftovers = [
            container
            for container in client.containers.list(all=True, filters={"label": SMOKE_LABEL})
            if _owner_is_gone(container.labels.get(OWNER_LABEL, ""))
        ]
        for container in leftovers:
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
        return len(leftovers)

    def check(self, image: str, example: Path | None, log: LogSink) -> None:
        """Start ``image`` confined; it must answer /ping and, given ``example``, the example.

        ``example`` is the model's input example file; the image holds the same file in its
        model directory, and that copy is what is posted (nothing enters the container).
        """
        started = time.monotonic()
        deadline = started + self._limits.timeout_seconds
        since = time.time()
        container = self._start(image)
        try:
            log(f"smoke test: waiting for {image} to answer /ping (no network, confined)")
            path = f"{MODEL_DIR}/{example.name}" if example is not None else ""
            detail = self._probe(container, deadline, path, since)
            if example is not None:
                log(f"smoke test: /invocations answered 200: {detail[:200]}")
            log(f"smoke test passed ({time.monotonic() - started:.1f}s)")
        finally:
            # Also on a timeout or an engine error; a leftover must not fail the build.
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)

    def _start(self, image: str) -> Any:
        client = self._engine.client
        try:
            options = confinement(self._limits, cpus_available=engine_cpus(client))
            # The image's serving command runs unchanged; stock MLflow's would otherwise start a
            # server process per CPU of the host, each loading the model.
            options["environment"]["MLFLOW_MODELS_WORKERS"] = "1"
            return client.containers.run(
                image, name=f"mlflow-dock-smoke-{uuid.uuid4().hex[:12]}", detach=True, **options
            )
        except Exception as exc:
            raise engine_error(exc, f"starting a smoke test of {image}") from exc

    def _probe(self, container: Any, deadline: float, example: str, since: float) -> str:
        """Wait for /ping and post the example inside the container; the answer's body.

        ``since``: the wall-clock time the container was started, for the engine's events.
        """
        budget = deadline - time.monotonic()
        command = ["python", "-I", "-S", "-c", _PROBE, str(SERVING_PORT), f"{budget:.1f}", example]
        try:
            _code, output = run_in_container(self._engine.client, container, command)
        except Exception as exc:
            # Typically "container is not running": it exited before the probe could start.
            output = ""
            if not self._exited(container):
                raise engine_error(exc, "running the smoke-test probe") from exc
        result = last_json_line(output)
        if not result:
            # The probe died with the container (the server exited or was killed), or the
            # kernel killed the probe itself or a server's child for the container's memory:
            # then the container runs on, and only the engine's 'oom' event says why. Both are
            # reported a moment after the exec's stream ends (seconds on a loaded engine):
            # without the grace, an OOM kill looked like a probe that failed for no reason, and
            # was retried.
            if self._ended(container, since, grace=EXIT_GRACE_SECONDS):
                raise PermanentError(self._exit_reason(container, since))
            raise RetryableError(f"smoke test: the probe gave no answer: {output[-300:]}")
        state = result.get("state")
        if state == "timeout":
            if self._exited(container):
                raise PermanentError(self._exit_reason(container, since))
            what = "on /ping" if result.get("stage") == "ping" else "from /invocations"
            raise PermanentError(
                f"smoke test: no answer {what} within {self._limits.timeout_seconds:.0f} s "
                "(MLFLOW_DOCK_SMOKE_TIMEOUT_SECONDS); " + _log_tail(container)
            )
        if state == "error" or result.get("status") != 200:
            if self._exited(container):
                raise PermanentError(self._exit_reason(container, since))
            answer = result.get("detail") or f"answered {result.get('status')}: " + str(
                result.get("body", "")
            )
            raise PermanentError(
                f"smoke test: /invocations with the model's input example {answer[:300]}"
            )
        return str(result.get("body", ""))

    @staticmethod
    def _exited(container: Any) -> bool:
        """Whether ``container`` has stopped, as the engine reports it now."""
        with contextlib.suppress(Exception):
            container.reload()
        return container.status in ("exited", "dead")

    def _ended(self, container: Any, since: float, *, grace: float) -> bool:
        """Whether ``container`` stopped or had a process OOM-killed, waiting up to ``grace``."""
        give_up = time.monotonic() + grace
        while True:
            if self._exited(container) or self._oom_reported(container, since):
                return True
            if time.monotonic() >= give_up:
                return False
            time.sleep(0.2)

    def _oom_reported(self, container: Any, since: float) -> bool:
        """Whether the engine reported an OOM kill of any of the container's processes.

        Its ``OOMKilled`` state covers only the container's main process; the 'oom' event covers
        every process in its memory cgroup, the exec'd probe included.
        """
        try:
            # Whole seconds (the engine's own timestamp format would read a fraction as
            # nanoseconds); ``until`` just past now, so the stream ends instead of following.
            events = self._engine.client.events(
                since=int(since) - 1,
                until=int(time.time()) + 1,
                filters={"container": container.id, "event": "oom"},
                decode=True,
            )
            return any(True for _event in events)
        except Exception:
            # No events from the engine: the exit, if any, still speaks for itself.
            return False

    def _exit_reason(self, container: Any, since: float) -> str:
        state = container.attrs.get("State") or {}
        if state.get("OOMKilled") or self._oom_reported(container, since):
            return (
                "smoke test: the model's server was killed for exceeding the memory limit "
                f"({self._limits.memory_text}, MLFLOW_DOCK_SMOKE_MEMORY); " + _log_tail(container)
            )
        return "smoke test: the container exited before answering /ping: " + _log_tail(container)


def _log_tail(container: Any, lines: int = 15) -> str:
    """The container's last log line first (usually the exception), then the tail for context."""
    try:
        raw = container.logs(tail=lines).decode("utf-8", "replace")
    except Exception:
        return "(container log unavailable)"
    kept = [line.strip() for line in raw.splitlines() if line.strip()]
    if not kept:
        return "(the container logged nothing)"
    return f"{kept[-1][:300]}; log tail: " + " | ".join(kept)[-1200:]
