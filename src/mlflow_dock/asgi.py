"""ASGI entry point for external servers: `uvicorn mlflow_dock.asgi:app --no-access-log`.

The only module-level app; settings are read here, at the edge. Uvicorn's defaults pick uvloop
and httptools (installed with `uvicorn[standard]`), as `mlflow-dock serve` does; its access log
(one line per request) is off in `serve` and costs a measurable share of the webhook intake's
CPU, hence `--no-access-log`.
"""

from __future__ import annotations

from mlflow_dock.app import create_asgi_app
from mlflow_dock.settings import load_settings

app = create_asgi_app(load_settings())
