"""mlflow-dock: MLflow Model Registry events -> serving images in a container registry.

The public surface is `__all__`; everything else (the packages `intake`, `jobs`, `store`,
`imaging`, `oci`, `cloud`, `mlflow`, `supply`, `observe`, `serving`) is implementation that may
change between releases (docs/code-layout.md).

Entry points: the `mlflow-dock` command (`mlflow_dock.cli`), `create_asgi_app(settings)` for an
ASGI app, `build_service(settings)` to run the service in-process, and `mlflow_dock.asgi:app`
(settings from the environment).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlflow_dock.errors import (
    ConfigError,
    JobError,
    MlflowDockError,
    PermanentError,
    RequestError,
    RetryableError,
)
from mlflow_dock.settings import Settings, load_settings

if TYPE_CHECKING:
    from mlflow_dock.app import Components, Service, build_service, create_asgi_app

__version__ = "0.1.0"

__all__ = [
    "Components",
    "ConfigError",
    "JobError",
    "MlflowDockError",
    "PermanentError",
    "RequestError",
    "RetryableError",
    "Service",
    "Settings",
    "__version__",
    "build_service",
    "create_asgi_app",
    "load_settings",
]

_WIRING = frozenset({"Components", "Service", "build_service", "create_asgi_app"})


def __getattr__(name: str) -> Any:
    # The wiring pulls in FastAPI, the Docker SDK and SQLAlchemy; `import mlflow_dock` (and the
    # CLI's --help) should not pay for them until they are asked for.
    if name in _WIRING:
        from mlflow_dock import app

        return getattr(app, name)
    raise AttributeError(f"module 'mlflow_dock' has no attribute {name!r}")
