"""A private RabbitMQ node for the Celery executor's `amqp://` broker path.

Private (own node name, ports and data directory) so it never meets a system node. Debian's
`rabbitmq-server` drops to the `rabbitmq` user when started as root, so its directories are
handed to that user first.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from support.servers import _spawn, free_port, kill_group, log_tail


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@dataclass
class RabbitServer:
    """`stop()` then `start()` is a broker crash: the same node, port and data come back."""

    workdir: Path
    port: int
    dist_port: int
    node: str
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        # The default guest user may connect from loopback only, which is all the tests need.
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log_path(self) -> Path:
        return self.workdir / "rabbitmq.log"

    def start(self, timeout: float = 90.0) -> None:
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.workdir / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
        }
        self._proc = _spawn(["rabbitmq-server"], self.log_path, env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {log_tail(self.log_path)}")
            if _accepts(self.port):
                return
            time.sleep(0.3)
        raise RuntimeError(f"rabbitmq-server not up in {timeout} s: {log_tail(self.log_path)}")

    def stop(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)
            self._proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_rabbitmq() -> RabbitServer:
    if shutil.which("rabbitmq-server") is None:
        raise RuntimeError("rabbitmq-server not found (apt-get install rabbitmq-server)")
    # Not under pytest's tmp_path: that tree is private to root, and the node runs as rabbitmq.
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-dock-rabbitmq-"))
    for path in (workdir, workdir / "mnesia", workdir / "log"):
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("rabbitmq")
            os.chown(path, user.pw_uid, user.pw_gid)
    server = RabbitServer(
        workdir, free_port(), free_port(), f"dock-{uuid.uuid4().hex[:8]}@localhost"
    )
    try:
        server.start()
    except RuntimeError:
        server.destroy()
        raise
    return server
