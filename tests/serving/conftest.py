"""Real MLflow models, saved once per session, and in-process servers for them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mlflow_dock.serving.server.app import create_app
from mlflow_dock.serving.server.config import ServerConfig
from support import v2_models
from support.v2_models import MODEL_NAME, MODEL_VERSION


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return v2_models.save_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def loaded(model_paths: dict[str, Path]) -> Callable[[str], Any]:
    import mlflow.pyfunc

    cache: dict[str, Any] = {}

    def load(name: str) -> Any:
        if name not in cache:
            cache[name] = mlflow.pyfunc.load_model(str(model_paths[name]))
        return cache[name]

    return load


def config(version: str | None = MODEL_VERSION, timeout: float = 60.0) -> ServerConfig:
    return ServerConfig(
        model_path=None,
        model_name=MODEL_NAME,
        model_version=version,
        host="127.0.0.1",
        port=8080,
        request_timeout=timeout,
    )


@pytest.fixture(scope="session")
def serve(loaded: Callable[[str], Any]) -> Callable[..., TestClient]:
    """serve("iris") -> a TestClient on the app for that model (name MODEL_NAME, version 3)."""

    def make(
        model: Any, *, version: str | None = MODEL_VERSION, timeout: float = 60.0
    ) -> TestClient:
        if isinstance(model, str):
            model = loaded(model)
        return TestClient(create_app(model, config(version, timeout)))

    return make
