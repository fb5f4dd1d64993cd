"""Real collaborators for integration tests and benchmarks.

Plain functions and classes (no pytest), so bench scripts can start the same registry,
MLflow server and mlflow-dock service as the test suite. Every server runs as a child
process in its own process group, so ``stop()`` also reaps whatever it spawned
(uvicorn workers, job runners) and nothing outlives the test session.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

from support import web

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPPORT_DIR = Path(__file__).resolve().parent
BASE_IMAGE_SCRIPT = SUPPORT_DIR / "build-base-image.sh"
DEFAULT_BASE_IMAGE = "mlflow-dock-test-base:bookworm-py3.11"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# The interpreter running the tests is the project venv (uv run / .venv/bin/python), which is
# the one that has mlflow, scikit-learn and mlflow_dock installed.
PYTHON = sys.executable

# Children must never try to phone home: the network here only reaches package indexes,
# and a telemetry attempt that hangs would show up as a slow startup.
_QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PYTHONUNBUFFERED": "1",
}


class ServerStartError(RuntimeError):
    """A child server died or never became ready; the message carries its log tail."""

    def __init__(self, message: str, *, exited: bool) -> None:
        super().__init__(message)
        # Only an early exit (e.g. the port was taken meanwhile) is worth a retry; a server
        # that hangs would just hang again.
        self.exited = exited


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def docker_available(timeout: float = 5.0) -> bool:
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=int(max(timeout, 1)))
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def missing_integration_prerequisites() -> list[str]:
    """Human-readable reasons the integration suite cannot run here (empty if it can)."""
    missing: list[str] = []
    if not docker_available():
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        missing.append(f"Docker Engine not reachable at {host}")
    if shutil.which("docker-registry") is None:
        missing.append("`docker-registry` (CNCF Distribution) not on PATH")
    if not _have_bcrypt() and shutil.which("htpasswd") is None:
        missing.append("neither the `bcrypt` package nor `htpasswd` (apache2-utils) available")
    return missing


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<no log at {path}>"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


def _spawn(argv: list[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = log_path.open("ab")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=log_path.parent,
            start_new_session=True,
        )
    finally:
        # The child holds its own descriptor; keeping ours open would leak one per start.
        log.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a group leader, so its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the process and its children, as a crash or an OOM kill would end them."""
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Workers may ignore SIGTERM or outlive a leader that already exited.
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _answers(url: str, status: int) -> Callable[[], bool]:
    def check() -> bool:
        return web.get(url, timeout=2).status_code == status

    return check


def _wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    *,
    what: str,
    log_path: Path,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{what} exited with code {proc.returncode} before becoming ready; "
                f"log {log_path}:\n{log_tail(log_path)}",
                exited=True,
            )
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{what} not ready after {timeout:.0f}s; log {log_path}:\n{log_tail(log_path)}",
                exited=False,
            )
        time.sleep(0.2)


# --------------------------------------------------------------------------- registry


def _have_bcrypt() -> bool:
    try:
        import bcrypt  # noqa: F401
    except ImportError:
        return False
    return True


def htpasswd_line(username: str, password: str) -> str:
    try:
        import bcrypt
    except ImportError:
        out = subprocess.run(
            ["htpasswd", "-Bbn", username, password],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    return f"{username}:{hashed}"


@dataclass
class RegistryServer:
    host: str
    url: str
    username: str
    password: str
    storage_dir: Path
    log_path: Path
    config_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def auth_config(self) -> dict[str, str]:
        """The docker SDK's per-call ``auth_config`` (tests never `docker login`)."""
        return {"username": self.username, "password": self.password}

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def stored_bytes(self) -> int:
        """Bytes of blob data the registry holds; benchmarks compare it before/after pushes."""
        blobs = self.storage_dir / "docker" / "registry" / "v2" / "blobs"
        if not blobs.exists():
            return 0
        return sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file())

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None


def _registry_config(workdir: Path, port: int, htpasswd_path: Path) -> dict[str, object]:
    return {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(workdir / "storage")},
            "delete": {"enabled": True},
            # The default upload purger scans every 24h and logs noise; tests never need it.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            # Without a fixed secret Distribution logs a warning and invents one per start.
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "auth": {"htpasswd": {"realm": "mlflow-dock-test", "path": str(htpasswd_path)}},
    }


def start_registry(
    workdir: Path, username: str, password: str, *, timeout: float = 30.0
) -> RegistryServer:
    """Start CNCF Distribution (`docker-registry serve`) with htpasswd auth on 127.0.0.1.

    Docker treats 127.0.0.0/8 as an insecure registry, so plain HTTP works for pushes.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd_path = workdir / "htpasswd"
    # Must exist before the registry starts: Distribution otherwise creates one with a random
    # password for a user "docker" and our credentials would be rejected.
    htpasswd_path.write_text(htpasswd_line(username, password) + "\n")
    config_path = workdir / "config.yml"
    log_path = workdir / "registry.log"
    env = {**os.environ, **_QUIET_ENV}

    def launch(port: int) -> tuple[RegistryServer, subprocess.Popen[bytes]]:
        # JSON is valid YAML, and avoids depending on a YAML emitter here.
        config_path.write_text(json.dumps(_registry_config(workdir, port, htpasswd_path), indent=2))
        proc = _spawn(["docker-registry", "serve", str(config_path)], log_path, env)
        server = RegistryServer(
            host=f"127.0.0.1:{port}",
            url=f"http://127.0.0.1:{port}",
            username=username,
            password=password,
            storage_dir=workdir / "storage",
            log_path=log_path,
            config_path=config_path,
            _proc=proc,
        )
        return server, proc

    return _start_on_free_port(
        launch, "/v2/", 401, what="docker-registry", log_path=log_path, timeout=timeout
    )


# --------------------------------------------------------------------------- MLflow server


@dataclass
class MlflowServer:
    url: str
    port: int
    workdir: Path
    log_path: Path
    backend_store_uri: str
    artifacts_dir: Path
    encryption_key: str
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None


# Generous: xdist's workers start their MLflow servers at the same moment on two cores.
def start_mlflow_server(workdir: Path, *, timeout: float = 300.0) -> MlflowServer:
    """Start a SQLite-backed `mlflow server` that proxies artifacts over HTTP.

    SQL backend because a file store never delivers webhooks; --serve-artifacts so clients in
    other processes (the service, containers on the host network) download models over HTTP
    from ``mlflow-artifacts:/`` instead of needing this machine's file system.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts_dir = workdir / "artifacts"
    artifacts_dir.mkdir(exist_ok=True)
    backend = f"sqlite:///{workdir / 'mlflow.db'}"
    log_path = workdir / "mlflow-server.log"
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()  # a Fernet key
    env = {
        **os.environ,
        **_QUIET_ENV,
        # Loopback receivers over plain HTTP are refused by default (SSRF protection).
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        # The server caches the webhook list per event for 60s by default, so a webhook created
        # by a test would miss the events that test triggers right after.
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        # Fixed per server so stored secrets stay readable for the server's whole life.
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key,
        # The job runner forks ~7 huey consumers: +25s startup and most of 2 CPU cores, for a
        # feature (GenAI jobs) these tests never use. Webhooks are delivered in-process.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # A tracking URI inherited from the caller's shell must not redirect the server.
    env.pop("MLFLOW_TRACKING_URI", None)

    def launch(port: int) -> tuple[MlflowServer, subprocess.Popen[bytes]]:
        argv = [
            PYTHON,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--serve-artifacts",
            "--artifacts-destination",
            str(artifacts_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        proc = _spawn(argv, log_path, env)
        server = MlflowServer(
            url=f"http://127.0.0.1:{port}",
            port=port,
            workdir=workdir,
            log_path=log_path,
            backend_store_uri=backend,
            artifacts_dir=artifacts_dir,
            encryption_key=key,
            _proc=proc,
        )
        return server, proc

    return _start_on_free_port(
        launch, "/health", 200, what="mlflow server", log_path=log_path, timeout=timeout
    )


# --------------------------------------------------------------------------- model server


@dataclass
class ModelServer:
    url: str
    port: int
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None


def start_model_server(
    model_dir: Path,
    workdir: Path,
    *,
    model_name: str,
    model_version: str,
    timeout: float = 180.0,
) -> ModelServer:
    """Run the serving layer as an image does: `python -m mlflow_dock_serving`, from its files.

    The layer's files are written out as the image holds them and put on PYTHONPATH, with the
    image's environment for the model; `import mlflow_dock` is made to fail, since no image
    has it. Uses this venv's MLflow and scikit-learn in place of the model's own virtualenv.
    """
    from mlflow_dock.serving import layer

    workdir = Path(workdir)
    root = workdir / "root"
    for path, content in layer.layer_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    blocker = workdir / "no-mlflow-dock" / "mlflow_dock"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text(
        'raise ImportError("the serving layer must not import mlflow_dock")\n'
    )
    log_path = workdir / "model-server.log"
    env = {
        **os.environ,
        **_QUIET_ENV,
        **layer.serving_env(model_name, model_version),
        "__pyfunc_model_path__": str(model_dir),
        "MLFLOW_DOCK_SERVING_HOST": "127.0.0.1",
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [str(blocker.parent), str(root / layer.SERVING_DIR.lstrip("/"))]
    )

    def launch(port: int) -> tuple[ModelServer, subprocess.Popen[bytes]]:
        # The image's PATH starts with the model's venv; here, this venv is the model's.
        argv = [PYTHON, *layer.SERVE_COMMAND[1:]]
        proc = _spawn(argv, log_path, {**env, "PORT": str(port)})
        return ModelServer(f"http://127.0.0.1:{port}", port, log_path, proc), proc

    return _start_on_free_port(
        launch, "/v2/health/ready", 200, what="model server", log_path=log_path, timeout=timeout
    )


_S = TypeVar("_S", RegistryServer, MlflowServer, ModelServer)


def _start_on_free_port(
    launch: Callable[[int], tuple[_S, subprocess.Popen[bytes]]],
    ready_path: str,
    ready_status: int,
    *,
    what: str,
    log_path: Path,
    timeout: float,
) -> _S:
    """Start a server on a free port, on a new port when it exits before it is ready.

    free_port() can race with another process grabbing the port, so an early exit is retried
    (three tries); a server that runs but never answers is not.
    """
    last_error: ServerStartError | None = None
    for _ in range(3):
        server, proc = launch(free_port())
        try:
            _wait_until(
                _answers(server.url + ready_path, ready_status),
                proc,
                what=what,
                log_path=log_path,
                timeout=timeout,
            )
        except ServerStartError as exc:
            server.stop()
            if not exc.exited:
                raise
            last_error = exc
            continue
        return server
    assert last_error is not None
    raise last_error


def log_sklearn_model(
    tracking_uri: str,
    model_name: str,
    *,
    broken: bool = False,
    pyfunc: str | None = None,
    probe_targets: Mapping[str, tuple[str, int]] | None = None,
    input_example: bool = True,
    pip_requirements: Sequence[str] | None = None,
    infer_requirements: bool = False,
    timeout: float = 180.0,
) -> str:
    """Register a new version of ``model_name`` and return its version string.

    ``broken=True`` registers a pyfunc model whose ``load_context`` raises, so anything that
    loads it (a serving container's smoke test) fails while logging/registering succeeds.
    ``pyfunc`` registers an adversarial model of log_model.py instead, active only inside an
    image: "probe" connects to ``probe_targets`` and predicts what happened, "hog" touches
    1 GiB, "sleeper" never finishes loading.

    Requirements default to an explicit list pinned to this venv's versions (mlflow,
    scikit-learn, skops, numpy, scipy, pandas; cloudpickle instead of the sklearn ones when
    broken), because MLflow's inference loads the model in yet another subprocess and costs
    ~13s per call. ``infer_requirements=True`` restores MLflow's own inference.
    ``pyfunc="tensor"`` or ``"params"`` registers the V2 test pyfunc of that name instead
    (tests/support/v2_model_code), with the same requirements unless given others.
    Model names may contain spaces and unicode but MLflow rejects '/' and ':'.
    """
    argv = ["--name", model_name]
    if broken:
        argv.append("--broken")
    if pyfunc is not None:
        argv += ["--pyfunc", pyfunc, "--probe-targets", json.dumps(dict(probe_targets or {}))]
    if not input_example:
        argv.append("--no-input-example")
    if infer_requirements:
        argv += ["--requirements", "infer"]
    elif pip_requirements is not None:
        argv += ["--requirements", json.dumps(list(pip_requirements))]
    answer = _MODEL_LOGGERS.log(argv, tracking_uri, timeout=timeout, what=repr(model_name))
    return str(answer["version"])


class _ModelLogger:
    """One ``log_model.py --serve`` process; its stdout lines arrive on a queue."""

    def __init__(self, log_dir: Path) -> None:
        env = {
            **os.environ,
            **_QUIET_ENV,
            # Run from the repo, MLflow would take this project's uv.lock (54 dev packages) as
            # the model's requirements; the model must declare what it needs, like a user's.
            "MLFLOW_UV_AUTO_DETECT": "false",
            "MLFLOW_LOG_UV_FILES": "false",
        }
        env.pop("MLFLOW_TRACKING_URI", None)  # each request names its server
        self.log_path = log_dir / f"log-model-{os.getpid()}-{secrets.token_hex(4)}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, str(SUPPORT_DIR / "log_model.py"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=log_dir,
                text=True,
                start_new_session=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # the process ended

    def ask(self, argv: list[str], tracking_uri: str, timeout: float) -> tuple[str, str]:
        """("result" or "error", its JSON text); raises RuntimeError if the process is lost."""
        assert self.proc.stdin is not None
        request = json.dumps({"argv": argv, "tracking_uri": tracking_uri})
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no answer within {timeout:.0f} s") from None
            if line is None:
                raise RuntimeError(f"log_model.py exited ({self.proc.wait()})")
            for kind in ("result", "error"):
                if line.startswith(f"@@{kind} "):
                    return kind, line.removeprefix(f"@@{kind} ")

    def stderr_tail(self) -> str:
        return log_tail(self.log_path, 60)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        _terminate(self.proc, timeout=5)  # type: ignore[arg-type]


class ModelLoggers:
    """Idle ``log_model.py --serve`` processes, one more whenever all are busy.

    A process per version cost an import of mlflow and scikit-learn each time (4-11 s of CPU,
    about 60 versions per suite run on 2 cores); a pool rather than one process because some
    tests log versions from several threads at once.
    """

    def __init__(self) -> None:
        self._idle: list[_ModelLogger] = []
        self._lock = threading.Lock()
        self._log_dir: Path | None = None

    def log(self, argv: list[str], tracking_uri: str, *, timeout: float, what: str) -> Any:
        with self._lock:
            logger = self._idle.pop() if self._idle else None
        if logger is None or logger.proc.poll() is not None:
            logger = _ModelLogger(self._started())
        try:
            kind, text = logger.ask(argv, tracking_uri, timeout)
        except RuntimeError as exc:
            logger.stop()
            raise RuntimeError(
                f"logging model {what} failed: {exc}\n{logger.stderr_tail()}"
            ) from None
        with self._lock:
            self._idle.append(logger)
        if kind == "error":
            error = json.loads(text)["error"]
            raise RuntimeError(f"logging model {what} failed:\n{error}\n{logger.stderr_tail()}")
        return json.loads(text)

    def _started(self) -> Path:
        with self._lock:
            if self._log_dir is None:
                self._log_dir = Path(tempfile.mkdtemp(prefix="mlflow-dock-model-loggers-"))
                atexit.register(self.close)
            return self._log_dir

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for logger in idle:
            logger.stop()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)


# A module-level pool, unlike anything in src/: log_sklearn_model is a plain function called
# from fixtures, tests and bench scripts alike, and the pool is only a cache of processes.
_MODEL_LOGGERS = ModelLoggers()


def register_model_version(
    tracking_uri: str, model_name: str, *, from_model: str, from_version: str
) -> str:
    """Register a new version of ``model_name`` reusing an already logged model's artifacts.

    ~50ms instead of ~10s for ``log_sklearn_model``: for tests that need many versions or
    events and do not care that the artifacts are identical. Creates the model if needed.
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    # Explicit URIs: MlflowClient() would otherwise use the process-global registry URI.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version(from_model, from_version)
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # MLflow 3 refuses a `models:/m-...` source unless model_id names that logged model.
    assert source.source, f"{from_model} v{from_version} has no source"
    model_id = source.model_id or source.source.rsplit("/", 1)[-1]
    created = client.create_model_version(
        model_name, source=source.source, run_id=source.run_id, model_id=model_id
    )
    return str(created.version)


# --------------------------------------------------------------------------- base image


def ensure_base_image(tag: str = DEFAULT_BASE_IMAGE, *, timeout: float = 1200.0) -> str:
    """Build (or reuse) the offline Debian + Python 3.11 base image and return its tag."""
    proc = subprocess.run(
        ["bash", str(BASE_IMAGE_SCRIPT), tag],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{BASE_IMAGE_SCRIPT.name} failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
        )
    return proc.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- mlflow-dock


SERVICE_COMMAND: tuple[str, ...] = (PYTHON, "-m", "mlflow_dock", "serve")


@dataclass
class ServiceProcess:
    """A running ``mlflow-dock serve``; ``kill()`` + ``restart()`` simulate a crash."""

    env: dict[str, str]
    workdir: Path
    log_path: Path
    port: int
    command: tuple[str, ...] = SERVICE_COMMAND
    startup_timeout: float = 180.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("service already running")
        with self.log_path.open("ab") as log:
            log.write(f"\n===== mlflow-dock start {time.strftime('%H:%M:%S')} =====\n".encode())
        self._proc = _spawn(list(self.command), self.log_path, self.env)
        try:
            _wait_until(
                _answers(f"{self.url}/health", 200),
                self._proc,
                what="mlflow-dock service",
                log_path=self.log_path,
                timeout=self.startup_timeout,
            )
        except ServerStartError:
            self.kill()
            raise

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful shutdown (SIGTERM, then wait); returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        # Reap anything the service left behind in its group (e.g. build helpers).
        _signal_group(proc, signal.SIGKILL)
        return proc.returncode

    def kill(self) -> None:
        """Abrupt death (SIGKILL to the whole group), as in a crash or OOM kill."""
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop if still running, then start again with the same env, port and data dir."""
        if self.running:
            self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def service_environment(
    registry: RegistryServer,
    mlflow_server: MlflowServer,
    *,
    secret: str,
    data_dir: Path,
    base_image: str,
    **extra: str,
) -> dict[str, str]:
    """What a `mlflow-dock serve` publishing to ``registry`` for ``mlflow_server``'s webhooks
    needs, on a free port, with ``extra`` settings on top."""
    env = {
        "MLFLOW_WEBHOOK_SECRET": secret,
        "DOCKER_USERNAME": registry.username,
        "DOCKER_REGISTRY_PASSWORD": registry.password,
        "DOCKER_REGISTRY": registry.host,
        "PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_DOCK_DATA_DIR": str(data_dir),
        "MLFLOW_DOCK_BASE_IMAGE": base_image,
    }
    # pip inside build containers reaches PyPI on this machine only via the system bundle.
    if SYSTEM_CA_BUNDLE.exists():
        env["MLFLOW_DOCK_BUILD_CA_BUNDLE"] = str(SYSTEM_CA_BUNDLE)
    return {**env, **extra}


def start_service(
    env: Mapping[str, str],
    workdir: Path,
    *,
    command: tuple[str, ...] | None = None,
    startup_timeout: float = 180.0,
) -> ServiceProcess:
    """Start ``python -m mlflow_dock serve`` with ``env`` layered over ``os.environ``.

    Waits for ``GET /health`` == 200 on ``env['PORT']`` (a free port is chosen if absent).
    ``command`` exists so the starter itself can be tested against a stand-in.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **_QUIET_ENV, **env}
    full_env.setdefault("PORT", str(free_port()))
    service = ServiceProcess(
        env=full_env,
        workdir=workdir,
        log_path=workdir / "service.log",
        port=int(full_env["PORT"]),
        command=command or SERVICE_COMMAND,
        startup_timeout=startup_timeout,
    )
    service.start()
    return service
