"""The serving layer every image carries: its files, the command that runs it, its environment.

The builders pack `layer_files()` as one layer (the native builder) or COPY it (the engine
builders), set `SERVE_COMMAND` as the image's command and `serving_env()` in its environment.
The layer depends on nothing but this package's own source, so it is byte-identical for every
model and version: registries and engines store it once.
"""

from __future__ import annotations

import re
from importlib import resources
from urllib.parse import quote

from .server.config import MODEL_NAME_ENV, MODEL_VERSION_ENV

# Inside the image. The directory goes on PYTHONPATH; the package name cannot collide with
# the service's own `mlflow_dock`, nor with anything a model might install.
SERVING_DIR = "/opt/mlflow-dock/serving"
PACKAGE = "mlflow_dock_serving"
SERVE_COMMAND: tuple[str, ...] = ("python", "-m", PACKAGE)
# What every image running the server sets (the runtime's part of the environment) ...
RUNTIME_ENV: dict[str, str] = {"PYTHONPATH": SERVING_DIR}
# ... and what differs per version: set last, replaced when the next version is assembled.
VERSION_ENV: tuple[str, ...] = (MODEL_NAME_ENV, MODEL_VERSION_ENV)

_SOURCE_PACKAGE = "mlflow_dock.serving.server"
# A V2 model name is one URL path segment; clients percent-encode the rest.
_UNUSABLE_NAME = re.compile(r"^\.{0,2}$|[/\x00-\x1f\x7f]")


def layer_files() -> dict[str, bytes]:
    """Path inside the image (relative to /, sorted) -> content, for every file of the layer.

    Reads only this package's own installed source (no cache files), so the result depends on
    the installed mlflow-dock alone. Modes, owners and timestamps are the packer's to fix.
    """
    source = resources.files(_SOURCE_PACKAGE)
    prefix = f"{SERVING_DIR.lstrip('/')}/{PACKAGE}"
    files = {
        f"{prefix}/{entry.name}": entry.read_bytes()
        for entry in source.iterdir()
        if entry.is_file() and entry.name.endswith(".py")
    }
    return dict(sorted(files.items()))


def usable_name(value: str) -> bool:
    """Whether ``value`` can be a V2 model name or version: one URL path segment."""
    return not _UNUSABLE_NAME.search(value)


def v2_model_name(model_name: str, repository: str) -> str:
    """The name V2 clients address a version's image by.

    The registered model's name as is (clients percent-encode spaces and the like), or the
    image repository's name (already sanitised, see oci/reference.py) when the model's name
    cannot be one URL path segment ("..", or a character MLflow allows but URLs do not).
    """
    return model_name if usable_name(model_name) else repository


def version_env(model_name: str, model_version: str) -> dict[str, str]:
    """The version's part of the image environment: its V2 name and version."""
    for what, value in (("model name", model_name), ("model version", model_version)):
        if not usable_name(value):
            raise ValueError(f"{value!r} cannot be a V2 {what} (one URL path segment)")
    return {MODEL_NAME_ENV: model_name, MODEL_VERSION_ENV: model_version}


def serving_env(model_name: str, model_version: str) -> dict[str, str]:
    """The image environment the server needs besides MLflow's `__pyfunc_model_path__`."""
    return {**RUNTIME_ENV, **version_env(model_name, model_version)}


def v2_infer_path(model_name: str, model_version: str | None) -> str:
    """The V2 inference path of a model (its name percent-encoded as one path segment)."""
    path = f"/v2/models/{quote(model_name, safe='')}"
    if model_version:
        path += f"/versions/{quote(model_version, safe='')}"
    return path + "/infer"
