"""What the server reads from its environment, read once at start.

Variable names are shared with the image builder (`mlflow_dock.serving.layer`), which sets the
model's name and version in the image's environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# MLflow's own variables, honoured as its scoring server does.
MODEL_PATH_ENV = "__pyfunc_model_path__"
REQUEST_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
# The name and version V2 clients address the model by (/v2/models/<name>/versions/<version>).
MODEL_NAME_ENV = "MLFLOW_DOCK_V2_MODEL_NAME"
MODEL_VERSION_ENV = "MLFLOW_DOCK_V2_MODEL_VERSION"
# PORT is what platforms such as Cloud Run and Knative inject; the image sets the other.
PORT_ENVS = ("PORT", "MLFLOW_DOCK_SERVING_PORT")
HOST_ENV = "MLFLOW_DOCK_SERVING_HOST"
# How long to wait for a model directory that is not there yet: KServe's modelcar sidecar
# links /mnt/models while the server container may already be starting.
MODEL_WAIT_ENV = "MLFLOW_DOCK_SERVING_MODEL_WAIT"

DEFAULT_PORT = 8080
DEFAULT_MODEL_NAME = "model"
DEFAULT_REQUEST_TIMEOUT = 60.0  # MLflow's default for the same variable
DEFAULT_MODEL_WAIT = 120.0


class ConfigError(ValueError):
    """The environment holds a value the server cannot use; the message names the variable."""


@dataclass(frozen=True)
class ServerConfig:
    model_path: str | None
    model_name: str
    model_version: str | None
    host: str
    port: int
    request_timeout: float
    model_wait: float = DEFAULT_MODEL_WAIT

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ServerConfig:
        port = DEFAULT_PORT
        for name in PORT_ENVS:
            raw = environ.get(name, "").strip()
            if raw:
                port = int(_number(name, raw, int))
                if not 0 < port < 65536:
                    raise ConfigError(f"{name}={raw!r} is not a TCP port")
                break
        timeout_raw = environ.get(REQUEST_TIMEOUT_ENV, "").strip()
        timeout = (
            _number(REQUEST_TIMEOUT_ENV, timeout_raw, float)
            if timeout_raw
            else DEFAULT_REQUEST_TIMEOUT
        )
        if timeout <= 0:
            raise ConfigError(f"{REQUEST_TIMEOUT_ENV}={timeout_raw!r} must be positive")
        wait_raw = environ.get(MODEL_WAIT_ENV, "").strip()
        wait = _number(MODEL_WAIT_ENV, wait_raw, float) if wait_raw else DEFAULT_MODEL_WAIT
        if wait < 0:
            raise ConfigError(f"{MODEL_WAIT_ENV}={wait_raw!r} must not be negative")
        return cls(
            model_path=environ.get(MODEL_PATH_ENV) or None,
            model_name=environ.get(MODEL_NAME_ENV, "").strip() or DEFAULT_MODEL_NAME,
            model_version=environ.get(MODEL_VERSION_ENV, "").strip() or None,
            host=environ.get(HOST_ENV, "").strip() or "0.0.0.0",  # noqa: S104 - a container's server
            port=port,
            request_timeout=timeout,
            model_wait=wait,
        )


def _number(name: str, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
