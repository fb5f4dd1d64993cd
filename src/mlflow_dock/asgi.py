"""ASGI entry point for external servers: `uvicorn mlflow_dock.asgi:app`.

The only module-level app; settings are read here, at the edge.
"""

from __future__ import annotations

from mlflow_dock.app import create_asgi_app
from mlflow_dock.settings import load_settings

app = create_asgi_app(load_settings())
