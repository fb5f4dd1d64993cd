"""The serving layer's files, command and environment, as the builders will take them."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from mlflow_dock.serving import layer

PREFIX = "opt/mlflow-dock/serving/mlflow_dock_serving/"


def test_the_layer_is_the_server_package_and_nothing_else():
    files = layer.layer_files()
    assert list(files) == sorted(files)
    assert all(path.startswith(PREFIX) for path in files)
    names = {path.removeprefix(PREFIX) for path in files}
    assert {"__init__.py", "__main__.py", "app.py", "v2.py", "tensors.py"} <= names
    assert all(name.endswith(".py") and "/" not in name for name in names)
    assert layer.layer_files() == files  # the same bytes every time


def test_the_shipped_modules_import_only_each_other_relatively():
    # Inside the image the package is mlflow_dock_serving: an absolute import of
    # mlflow_dock.serving.server would fail there.
    for path, content in layer.layer_files().items():
        for node in ast.walk(ast.parse(content)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            assert not any(m.split(".")[0] == "mlflow_dock" for m in modules), path


def test_the_rendered_layer_imports_without_mlflow_dock(tmp_path):
    for path, content in layer.layer_files().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(content)
    check = (
        "import sys, mlflow_dock_serving.app, mlflow_dock_serving.__main__;"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow_dock'], 'imported';"
        "print(mlflow_dock_serving.app.create_app.__module__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        env={"PYTHONPATH": str(tmp_path / layer.SERVING_DIR.lstrip("/"))},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mlflow_dock_serving.app"


def test_command_and_environment():
    assert layer.SERVE_COMMAND == ("python", "-m", "mlflow_dock_serving")
    assert layer.serving_env("fraud model", "7") == {
        "PYTHONPATH": "/opt/mlflow-dock/serving",
        "MLFLOW_DOCK_V2_MODEL_NAME": "fraud model",
        "MLFLOW_DOCK_V2_MODEL_VERSION": "7",
    }


@pytest.mark.parametrize(("name", "version"), [("a/b", "1"), ("..", "1"), ("m", ""), ("m", "1\n")])
def test_names_that_cannot_be_a_path_segment_are_refused(name, version):
    with pytest.raises(ValueError, match="cannot be a V2"):
        layer.serving_env(name, version)


def test_the_v2_name_is_the_model_s_unless_it_cannot_be_one_path_segment():
    assert layer.v2_model_name("Iris Classifier", "iris-classifier-50874a8e73") == (
        "Iris Classifier"
    )
    assert layer.v2_model_name("..", "model-1a2b3c4d5e") == "model-1a2b3c4d5e"
    assert layer.v2_model_name("a\x7fb", "a-b-0123456789") == "a-b-0123456789"


def test_the_version_s_part_of_the_environment_is_what_assembly_replaces():
    assert layer.version_env("m", "3") == {
        "MLFLOW_DOCK_V2_MODEL_NAME": "m",
        "MLFLOW_DOCK_V2_MODEL_VERSION": "3",
    }
    assert tuple(layer.version_env("m", "3")) == layer.VERSION_ENV
    assert layer.serving_env("m", "3") == {**layer.RUNTIME_ENV, **layer.version_env("m", "3")}


def test_the_infer_path_percent_encodes_the_name():
    assert layer.v2_infer_path("Iris Classifier", "3") == (
        "/v2/models/Iris%20Classifier/versions/3/infer"
    )
    assert layer.v2_infer_path("a/b?", None) == "/v2/models/a%2Fb%3F/infer"
