"""The app factory: MLflow's app behind /v2, the model loaded from the image's path."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from mlflow_dock.serving.server.app import create_app, model_root, wait_for_model
from mlflow_dock.serving.server.config import ServerConfig
from support.v2_models import MODEL_NAME


def test_the_app_loads_the_model_at_the_configured_path(model_paths):
    config = ServerConfig.from_environ(
        {
            "__pyfunc_model_path__": str(model_paths["tensor"]),
            "MLFLOW_DOCK_V2_MODEL_NAME": MODEL_NAME,
        }
    )
    client = TestClient(create_app(config=config))
    assert client.get("/ping").status_code == 200
    metadata = client.get(f"/v2/models/{MODEL_NAME}").json()
    assert metadata["inputs"][0]["name"] == "x"


def test_a_file_uri_is_a_local_path_too(model_paths):
    assert wait_for_model(model_paths["iris"].as_uri(), 0)


def test_without_a_model_path_there_is_nothing_to_serve():
    with pytest.raises(RuntimeError, match="__pyfunc_model_path__"):
        create_app(config=ServerConfig.from_environ({}))


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = 0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.sleeps += 1


def test_waits_for_a_model_directory_that_appears_late(tmp_path, model_paths):
    clock = FakeClock()
    late = tmp_path / "models"

    def sleep(seconds):
        clock.sleep(seconds)
        if clock.sleeps == 3:  # the modelcar sidecar links the model
            late.symlink_to(model_paths["iris"])

    assert wait_for_model(str(late), 60, sleep=sleep, clock=clock)
    assert clock.sleeps == 3


def test_gives_up_after_the_wait(tmp_path):
    clock = FakeClock()
    assert not wait_for_model(str(tmp_path / "never"), 5, sleep=clock.sleep, clock=clock)
    assert clock.now == pytest.approx(5.0)
    assert wait_for_model("models:/fraud/7", 5, sleep=clock.sleep, clock=clock)  # not local


def test_config_defaults_wait_two_minutes():
    assert dataclasses.asdict(ServerConfig.from_environ({}))["model_wait"] == 120.0


def test_a_local_model_directory_is_loaded_as_its_own_artifact_root():
    # KServe's Modelcar link (/mnt/models -> /proc/<pid>/root/models) would otherwise resolve
    # outside /mnt in MLflow's own symlink check (tests/integration/test_open_inference.py).
    assert model_root("/mnt/models") == "/mnt/models/"
    assert model_root("/opt/ml/model/") == "/opt/ml/model/"
    assert model_root("file:///mnt/models") == "file:///mnt/models"
    assert model_root("models:/fraud/7") == "models:/fraud/7"
    assert model_root("s3://bucket/model") == "s3://bucket/model"


def test_a_model_behind_a_symlink_out_of_its_directory_loads(tmp_path, model_paths):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "models").symlink_to(model_paths["iris"])
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(model_root(str(tmp_path / "mnt/models")))
    assert model.metadata.flavors
