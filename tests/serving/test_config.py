"""What the server reads from its environment."""

from __future__ import annotations

import pytest

from mlflow_dock.serving.server.config import ConfigError, ServerConfig


def test_defaults():
    config = ServerConfig.from_environ({})
    assert config == ServerConfig(
        model_path=None,
        model_name="model",
        model_version=None,
        host="0.0.0.0",
        port=8080,
        request_timeout=60.0,
    )


def test_the_image_environment():
    config = ServerConfig.from_environ(
        {
            "__pyfunc_model_path__": "/mnt/models",
            "MLFLOW_DOCK_V2_MODEL_NAME": "fraud",
            "MLFLOW_DOCK_V2_MODEL_VERSION": "12",
            "MLFLOW_DOCK_SERVING_PORT": "8080",
            "PORT": "9000",  # injected by the platform: wins over the image's own
            "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "2.5",
            "MLFLOW_DOCK_SERVING_MODEL_WAIT": "0",
        }
    )
    assert (config.model_path, config.model_name, config.model_version) == (
        "/mnt/models",
        "fraud",
        "12",
    )
    assert (config.port, config.request_timeout, config.model_wait) == (9000, 2.5, 0.0)


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"PORT": "http"}, "PORT='http' is not a number"),
        ({"PORT": "70000"}, "not a TCP port"),
        ({"MLFLOW_DOCK_SERVING_PORT": "0"}, "not a TCP port"),
        ({"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "-1"}, "must be positive"),
        ({"MLFLOW_DOCK_SERVING_MODEL_WAIT": "-5"}, "must not be negative"),
    ],
)
def test_unusable_values_name_the_variable(environ, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ServerConfig.from_environ(environ)
