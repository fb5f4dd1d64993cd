"""Private PostgreSQL and Redis servers and `mlflow-dock worker` processes for fault tests.

Private (one per test, on free ports) because the tests stop, restart and kill them; the
shared cluster `.ci/run` starts is left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from support.servers import (
    _QUIET_ENV,
    PYTHON,
    _signal_group,
    _spawn,
    free_port,
    kill_group,
    log_tail,
)

PG_BIN = Path("/usr/lib/postgresql")


def _pg_bin(name: str) -> str:
    versions = sorted((p for p in PG_BIN.glob("*/bin") if (p / name).exists()), key=str)
    if not versions:
        raise RuntimeError(
            f"PostgreSQL's {name} not found under {PG_BIN} (apt-get install postgresql)"
        )
    return str(versions[-1] / name)


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class PostgresServer:
    """A throwaway cluster: `stop()` and `start()` simulate an outage of the database."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-o",
                    options,
                    "-l",
                    str(self.data_dir / "server.log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
        )

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_postgres() -> PostgresServer:
    # Outside pytest's tmp dirs: those are root-only, and the server runs as `postgres`.
    data_dir = Path(tempfile.mkdtemp(prefix="mlflow-dock-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
    subprocess.run(
        _as_postgres(
            [_pg_bin("initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    server = PostgresServer(data_dir, free_port())
    server.start()
    return server


@dataclass
class RedisServer:
    """A broker without persistence: `restart()` loses every message, as a crash would."""

    workdir: Path
    port: int
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._proc = _spawn(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            self.workdir / "redis.log",
            os.environ,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.2)
        raise RuntimeError(f"redis did not start: {log_tail(self.workdir / 'redis.log')}")

    def stop(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_redis(workdir: Path) -> RedisServer:
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir, free_port())
    server.start()
    return server


WORKER_COMMAND = (PYTHON, "-m", "mlflow_dock", "worker")


@dataclass
class WorkerProcess:
    """A running `mlflow-dock worker`; `kill()` is kill -9 of its whole process group."""

    env: dict[str, str]
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 60.0) -> None:
        self._proc = _spawn(list(WORKER_COMMAND), self.log_path, self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"worker exited: {log_tail(self.log_path)}")
            if " ready." in self.log_text():
                return
            time.sleep(0.3)
        raise RuntimeError(f"worker not ready in {timeout} s: {log_tail(self.log_path)}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_worker(env: Mapping[str, str], workdir: Path) -> WorkerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(
        {**os.environ, **_QUIET_ENV, **env}, workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
    )
    worker.start()
    return worker
