"""Big models for tests and benchmarks: incompressible weights, registered in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from support.servers import _QUIET_ENV, PYTHON

SCRIPT = Path(__file__).resolve().parent / "log_weights_model.py"
_CHUNK = 1 << 20


def write_weights(path: Path, size: int) -> Path:
    """``size`` random (incompressible) bytes at ``path``, written a mebibyte at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left > 0:
            out.write(os.urandom(min(_CHUNK, left)))
            left -= _CHUNK
    return path


@dataclass(frozen=True)
class Logged:
    source: str  # models:/m-...
    run_id: str
    model_id: str
    version: str | None  # None: logged, not registered


def log_weights_model(
    tracking_uri: str,
    name: str,
    weights: Path,
    *,
    marker: str = "",
    register: bool = True,
    timeout: float = 3600,
) -> Logged:
    """Log a model holding ``weights`` and register it as a new version of ``name``.

    ``marker`` lands in the model's MLmodel: versions with the same weights and another marker
    differ in a small file only. ``register=False`` only logs it (see :func:`register`).
    """
    env = {
        **os.environ,
        **_QUIET_ENV,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_UV_AUTO_DETECT": "false",
        "MLFLOW_LOG_UV_FILES": "false",
    }
    argv = [PYTHON, str(SCRIPT), "--name", name, "--weights", str(weights), "--marker", marker]
    if not register:
        argv.append("--no-register")
    with tempfile.TemporaryDirectory(prefix="mlflow-dock-log-weights-") as cwd:
        proc = subprocess.run(
            argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"logging {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
        )
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return Logged(**json.loads(line))
    raise RuntimeError(f"{SCRIPT.name} printed no version:\n{proc.stdout}\n{proc.stderr[-3000:]}")


def register(tracking_uri: str, name: str, logged: Logged) -> str:
    """Register ``logged`` as a new version of ``name`` (created if needed); its version."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    created = client.create_model_version(
        name, source=logged.source, run_id=logged.run_id, model_id=logged.model_id
    )
    return str(created.version)
