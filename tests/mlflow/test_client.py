"""Reading a downloaded model (confined to its directory) and where downloads may go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.artifacts
import pytest

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.mlflow.client import MlflowSource, _concrete_uri, read_package
from mlflow_dock.mlflow.sources import AllowedSources, SourceNotAllowed

MLMODEL = """\
artifact_path: model
flavors:
  python_function:
    env:
      conda: conda.yaml
      virtualenv: python_env.yaml
    loader_module: mlflow.sklearn
    python_version: 3.11.7
mlflow_version: 3.17.2
saved_input_example_info:
  serving_input_path: serving_input_example.json
"""
PYTHON_ENV = (
    "python: 3.11.7\nbuild_dependencies:\n- pip==24.0\ndependencies:\n- -r requirements.txt\n"
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "MLmodel").write_text(MLMODEL)
    (path / "python_env.yaml").write_text(PYTHON_ENV)
    (path / "requirements.txt").write_text("mlflow==3.17.2\nscikit-learn==1.9.1\n")
    (path / "serving_input_example.json").write_text('{"inputs": [[1, 2]]}')
    return path


def with_mlmodel(model: Path, old: str, new: str) -> Path:
    (model / "MLmodel").write_text(MLMODEL.replace(old, new))
    return model


def test_a_model_as_mlflow_writes_it_is_read(model):
    package = read_package(model)
    assert package.python_version == "3.11"
    assert package.requirements == "mlflow==3.17.2\nscikit-learn==1.9.1\n"
    assert package.has_serving_example


@pytest.mark.parametrize(
    "path", ["../../../etc/passwd", "/etc/passwd", "sub/../../outside.json", "\\\\host\\x"]
)
def test_serving_input_path_outside_the_model_fails_the_version(model, path):
    with_mlmodel(model, "serving_input_example.json", f"'{path}'")
    with pytest.raises(PermanentError, match="serving_input_path"):
        read_package(model)


def test_a_symlink_out_of_the_model_directory_is_not_followed(model, tmp_path):
    secret = tmp_path / "worker-secret.json"
    secret.write_text('{"token": "worker-only"}')
    (model / "serving_input_example.json").unlink()
    os.symlink(secret, model / "serving_input_example.json")
    with pytest.raises(PermanentError, match="leads outside the model directory") as info:
        read_package(model)
    assert "worker-only" not in str(info.value)


def test_a_symlinked_requirements_file_is_not_read(model, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (model / "requirements.txt").unlink()
    os.symlink(outside, model / "requirements.txt")
    with pytest.raises(PermanentError, match=r"requirements\.txt") as info:
        read_package(model)
    assert "root:x" not in str(info.value)


def test_symlinks_inside_the_model_directory_are_fine(model):
    (model / "examples").mkdir()
    (model / "serving_input_example.json").rename(model / "examples" / "input.json")
    os.symlink("examples/input.json", model / "serving_input_example.json")
    assert read_package(model).has_serving_example


@pytest.mark.parametrize("key", ["virtualenv", "conda"])
def test_env_files_mlmodel_names_are_confined_too(model, key):
    with_mlmodel(model, f"{key}: ", f"{key}: ../../etc/")
    (model / "requirements.txt").unlink()  # so that the conda file would be read
    with pytest.raises(PermanentError, match="not a path inside the model directory"):
        read_package(model)


@pytest.mark.parametrize(
    "entry",
    [
        "--index-url http://127.0.0.1:9/simple",
        "-r /etc/passwd",
        "-e git+https://h/r.git",
        "pkg @ https://h/pkg.whl",
        "${HOME}",
    ],
)
def test_python_env_entries_other_than_names_fail(model, entry):
    # MLflow's stock builder hands these to pip as arguments.
    (model / "python_env.yaml").write_text(PYTHON_ENV + f"- '{entry}'\n")
    with pytest.raises(PermanentError, match="python_env dependencies entry"):
        read_package(model)


def test_conda_only_models_use_the_pip_section_as_mlflow_does(model):
    (model / "requirements.txt").unlink()
    (model / "python_env.yaml").unlink()
    (model / "conda.yaml").write_text(
        "channels: [conda-forge]\n"
        "dependencies:\n- python=3.10.4\n- pip<=23\n- libgomp\n"
        "- pip:\n  - mlflow==2.0.1\n  - scikit-learn==1.1.0\n"
    )
    package = read_package(model)
    # Conda packages (libgomp) are not installed, as MLflow ignores them for pip environments.
    assert package.requirements == "mlflow==2.0.1\nscikit-learn==1.1.0\n"
    assert package.python_version == "3.11"  # the flavor's, as before


def test_conda_only_pip_entries_reach_the_requirements_policy_unfiltered(model):
    (model / "requirements.txt").unlink()
    (model / "conda.yaml").write_text("dependencies:\n- pip:\n  - -r /etc/passwd\n")
    assert read_package(model).requirements == "-r /etc/passwd\n"  # refused by the runner


def test_deeply_nested_yaml_and_json_are_errors_not_crashes(model):
    (model / "MLmodel").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PermanentError, match=r"nested too deeply|python_function"):
        read_package(model)
    (model / "MLmodel").write_text(MLMODEL)
    (model / "serving_input_example.json").write_text("[" * 100_000 + "]" * 100_000)
    assert not read_package(model).has_serving_example


# --------------------------------------------------------------------------- download sources

EVIL_ID = "m-" + "e" * 32


@dataclass
class _Info:
    artifact_uri: str = "mlflow-artifacts:/1/run-1/artifacts"
    experiment_id: str = "1"


@dataclass
class _Run:
    info: _Info = field(default_factory=_Info)


@dataclass
class _Logged:
    artifact_location: str
    source_run_id: str = "run-1"


class _Page(list[Any]):
    token: str | None = None


class FakeClient:
    """The MLflow client calls resolution makes, answered from dictionaries."""

    def __init__(self, download_uri: str, **logged: str) -> None:
        self.download_uri = download_uri
        self.logged = logged
        self.calls: list[str] = []

    def get_model_version_download_uri(self, name: str, version: str) -> str:
        self.calls.append(f"download_uri {name} {version}")
        return self.download_uri

    def get_logged_model(self, model_id: str) -> _Logged:
        return _Logged(self.logged[model_id])

    def get_run(self, run_id: str) -> _Run:
        return _Run()

    def search_logged_models(self, **kw: Any) -> _Page:
        page = _Page()
        name = kw["filter_string"].split("'")[1]
        if name in self.logged:
            page.append(_Logged(self.logged[name]))
        return page


def test_models_and_runs_uris_resolve_to_where_mlflow_fetches_from():
    client = FakeClient("mlflow-artifacts:/1/models/m-1/artifacts", **{EVIL_ID: "s3://b/m-1"})
    assert _concrete_uri(client, f"models:/{EVIL_ID}") == "s3://b/m-1"
    assert _concrete_uri(client, "models:/Iris/3") == "mlflow-artifacts:/1/models/m-1/artifacts"
    assert (
        _concrete_uri(client, "models:/Iris/3/sub")
        == "mlflow-artifacts:/1/models/m-1/artifacts/sub"
    )
    # MLflow 3: runs:/<run>/<name> is the run's logged model of that name if it has one ...
    client = FakeClient("", model="gs://other/models/m-2/artifacts")
    assert _concrete_uri(client, "runs:/run-1/model") == "gs://other/models/m-2/artifacts"
    # ... else the run's own artifacts.
    assert _concrete_uri(client, "runs:/run-1/clf") == "mlflow-artifacts:/1/run-1/artifacts/clf"
    assert _concrete_uri(client, "s3://b/x") == "s3://b/x"


def test_resolution_refuses_loops_and_other_workspaces():
    client = FakeClient("models:/Iris/3")
    with pytest.raises(SourceNotAllowed, match="indirections"):
        _concrete_uri(client, "models:/Iris/3")
    with pytest.raises(SourceNotAllowed, match="databricks"):
        _concrete_uri(client, "models://scope:prefix@databricks/Iris/3")


@pytest.mark.parametrize(
    "source",
    ["http://127.0.0.1:9/evil", "file:///etc", "s3://another-team/models/x", f"models:/{EVIL_ID}"],
)
def test_download_from_a_location_not_allowed_makes_no_request(monkeypatch, tmp_path, source):
    fetched: list[str] = []
    monkeypatch.setattr(
        mlflow.artifacts, "download_artifacts", lambda **kw: fetched.append(kw["artifact_uri"])
    )
    client = FakeClient(source, **{EVIL_ID: "https://evil.example/artifacts"})
    mlflow_source = MlflowSource("http://127.0.0.1:5000")
    monkeypatch.setattr(mlflow_source, "_client", lambda: client)
    with pytest.raises(SourceNotAllowed, match="are not downloaded"):
        mlflow_source.download("Iris", "3", tmp_path / "download")
    assert fetched == []


def test_download_from_an_allowed_location_fetches_that_location(monkeypatch, tmp_path, model):
    fetched: list[str] = []

    def download(**kw: Any) -> str:
        fetched.append(kw["artifact_uri"])
        return str(model)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    client = FakeClient(f"models:/{EVIL_ID}", **{EVIL_ID: "s3://team/models/m-1/artifacts"})
    allowed = AllowedSources("http://127.0.0.1:5000", ("s3://team/models/",))
    mlflow_source = MlflowSource("http://127.0.0.1:5000", allowed_sources=allowed)
    monkeypatch.setattr(mlflow_source, "_client", lambda: client)
    assert mlflow_source.download("Iris", "3", tmp_path / "download").python_version == "3.11"
    assert fetched == ["s3://team/models/m-1/artifacts"]


def test_resolution_failures_keep_their_retry_class(monkeypatch, tmp_path):
    class Down(FakeClient):
        def get_model_version_download_uri(self, name: str, version: str) -> str:
            raise ConnectionError("tracking server down")

    mlflow_source = MlflowSource("http://127.0.0.1:5000")
    monkeypatch.setattr(mlflow_source, "_client", lambda: Down(""))
    with pytest.raises(RetryableError, match="cannot reach MLflow"):
        mlflow_source.download("Iris", "3", tmp_path / "download")


def in_place_source(monkeypatch, tmp_path: Path, uri: str) -> tuple[MlflowSource, list[str]]:
    fetched: list[str] = []

    def download(**kw: Any) -> str:
        fetched.append(kw["artifact_uri"])
        raise AssertionError("downloaded")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    source = MlflowSource("http://127.0.0.1:5000", artifacts_destination=tmp_path / "store")
    monkeypatch.setattr(source, "_client", lambda: FakeClient(uri))
    return source, fetched


def test_a_version_in_the_artifact_destination_is_read_in_place(monkeypatch, tmp_path, model):
    artifacts = tmp_path / "store" / "1" / "models" / "m-1" / "artifacts"
    artifacts.parent.mkdir(parents=True)
    model.rename(artifacts)
    for uri in (
        "mlflow-artifacts:/1/models/m-1/artifacts",
        "mlflow-artifacts://127.0.0.1:5000/1/models/m-1/artifacts",
    ):
        source, fetched = in_place_source(monkeypatch, tmp_path, uri)
        package = source.download("Iris", "3", tmp_path / "download")
        assert package.in_place and package.path == artifacts.resolve() and fetched == []
        assert not (tmp_path / "download").exists() or not any((tmp_path / "download").iterdir())


@pytest.mark.parametrize(
    "uri",
    [
        "mlflow-artifacts:/1/models/m-9/artifacts",  # not there (yet): downloaded as usual
        "mlflow-artifacts:/1/escape/artifacts",  # a symlink out of the destination
        "mlflow-artifacts://other-host:5000/1/models/m-1/artifacts",  # not the tracking server
    ],
)
def test_anything_else_is_downloaded_never_read_outside(monkeypatch, tmp_path, model, uri):
    (tmp_path / "store" / "1").mkdir(parents=True)
    (tmp_path / "store" / "1" / "escape").symlink_to(model.parent)
    model.rename(model.parent / "artifacts")
    source, fetched = in_place_source(monkeypatch, tmp_path, uri)
    if "other-host" in uri:
        with pytest.raises(SourceNotAllowed):
            source.download("Iris", "3", tmp_path / "download")
        assert fetched == []
        return
    with pytest.raises(RetryableError, match="downloaded"):  # the fake download's answer
        source.download("Iris", "3", tmp_path / "download")
    assert fetched == [uri]
