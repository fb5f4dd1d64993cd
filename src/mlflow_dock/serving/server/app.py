"""The ASGI app every serving image runs: MLflow's scoring app, with /v2 in front of it.

MLflow's own app (`mlflow.pyfunc.scoring_server.init`) answers everything outside /v2 exactly
as `mlflow.pyfunc.scoring_server.app:app` would: /ping, /health, /version, /invocations. The V2
routes use the very model object it holds, loaded once.

    uvicorn --factory mlflow_dock_serving.app:create_app    # or: python -m mlflow_dock_serving
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import ServerConfig
from .v2 import Receive, Scope, Send, V2Server

_logger = logging.getLogger(__name__)


class ProtocolRouter:
    """Sends /v2 requests to the V2 server and everything else (lifespan too) to MLflow's app."""

    def __init__(self, v2: Any, mlflow_app: Any) -> None:
        self._v2 = v2
        self._mlflow = mlflow_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path == "/v2" or path.startswith("/v2/"):
                await self._v2(scope, receive, send)
                return
        await self._mlflow(scope, receive, send)


def create_app(model: Any = None, config: ServerConfig | None = None) -> ProtocolRouter:
    """The app for `model` (a loaded pyfunc), or for the one at `__pyfunc_model_path__`."""
    from mlflow.pyfunc import scoring_server

    if config is None:
        config = ServerConfig.from_environ(os.environ)
    if model is None:
        if config.model_path is None:
            raise RuntimeError("__pyfunc_model_path__ is not set: no model to serve")
        wait_for_model(config.model_path, config.model_wait)
        # MLflow's own loader: it honours SERVING_MODEL_CONFIG as MLflow's app does.
        model = scoring_server.load_model_with_mlflow_config(  # type: ignore[no-untyped-call]
            model_root(config.model_path)
        )
    mlflow_app = scoring_server.init(model)
    v2 = V2Server(
        model,
        name=config.model_name,
        version=config.model_version,
        request_timeout=config.request_timeout,
    )
    return ProtocolRouter(v2, mlflow_app)


def model_root(location: str) -> str:
    """``location`` as MLflow's loader must get it: a local directory with a trailing slash.

    MLflow loads a local path as the artifact ``basename`` under the root ``dirname`` and
    refuses it when, symlinks resolved, it lies outside that root. It resolves them itself,
    one readlink at a time, so KServe's Modelcar link ``/mnt/models -> /proc/<pid>/root/models``
    resolves to this container's own ``/models`` (``readlink /proc/<pid>/root`` is "/"): outside
    ``/mnt``, refused ("resolved path is outside the artifact directory"). With the directory
    itself as the root there is nothing to be outside of; the kernel, which resolves the link
    in the Modelcar's file system, then opens the files.
    """
    if urlsplit(location).scheme not in ("", "file") or location.startswith("file:"):
        return location
    return location.rstrip("/") + "/"


def wait_for_model(
    location: str,
    seconds: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait until a local model directory holds its MLmodel file; False when it never came.

    A KServe modelcar links /mnt/models from a sidecar that starts alongside the server, so
    the directory may appear a little after the server starts. Remote URIs are not waited
    for; a model that never appears is left to MLflow's loader to report.
    """
    split = urlsplit(location)
    if split.scheme not in ("", "file"):
        return True
    marker = Path(split.path if split.scheme else location) / "MLmodel"
    deadline = clock() + seconds
    announced = False
    while not marker.exists():
        if clock() >= deadline:
            return False
        if not announced:
            _logger.warning("waiting up to %gs for the model at %s", seconds, marker.parent)
            announced = True
        sleep(0.5)
    return True
