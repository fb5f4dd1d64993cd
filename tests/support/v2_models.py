"""Small real MLflow models, saved as a serving image holds them, for the serving-layer tests.

Each is a model directory MLflow's `save_model` wrote (MLmodel, requirements, artifacts); the
pyfuncs are models-from-code (the files in v2_model_code/), so loading one needs no test module
on the path, just as inside an image.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parent / "v2_model_code"
# The V2 name and version the serving tests give every model.
MODEL_NAME = "iris-classifier"
MODEL_VERSION = "3"
IRIS_COLUMNS = ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)")


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    # The repository is a uv project: MLflow would copy its uv.lock into every model.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_UV_AUTO_DETECT", "MLFLOW_DISABLE_TELEMETRY")}
    os.environ.update(MLFLOW_UV_AUTO_DETECT="false", MLFLOW_DISABLE_TELEMETRY="true")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def save_models(directory: Path) -> dict[str, Path]:
    """Save every test model under `directory`; name -> model directory."""
    import numpy as np
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    import mlflow

    paths = {name: directory / name for name in _NAMES}
    requirements = ["mlflow", "numpy", "pandas"]
    with _quiet_mlflow():
        features, target = load_iris(return_X_y=True, as_frame=True)
        classifier = LogisticRegression(max_iter=500).fit(features, target)
        mlflow.sklearn.save_model(
            classifier,
            paths["iris"],
            signature=infer_signature(features, classifier.predict(features)),
            pip_requirements=[*requirements, "scikit-learn"],
        )
        tensor_signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3), "x")]),
            outputs=Schema(
                [
                    TensorSpec(np.dtype("float32"), (-1,), "sum"),
                    TensorSpec(np.dtype("float32"), (-1, 3), "scaled"),
                ]
            ),
        )
        params_signature = ModelSignature(
            inputs=Schema([ColSpec("double", "a")]),
            outputs=Schema([ColSpec("double")]),
            params=ParamSchema(
                [ParamSpec("scale", "double", 1.0), ParamSpec("tag", "string", "x")]
            ),
        )
        mixed_signature = ModelSignature(
            inputs=Schema(
                [
                    ColSpec("string", "name"),
                    ColSpec("long", "count"),
                    ColSpec("boolean", "flag"),
                    ColSpec("float", "ratio"),
                ]
            ),
            outputs=Schema(
                [ColSpec("string", "label"), ColSpec("double", "score"), ColSpec("boolean", "flag")]
            ),
        )
        for name, signature in (
            ("tensor", tensor_signature),
            ("params", params_signature),
            ("mixed", mixed_signature),
            ("schemaless", None),
            ("hinted", None),  # MLflow infers it from the type hints
        ):
            mlflow.pyfunc.save_model(
                paths[name],
                python_model=str(CODE_DIR / f"{name}_model.py"),
                signature=signature,
                pip_requirements=requirements,
            )
    return paths


_NAMES = ("iris", "tensor", "params", "mixed", "schemaless", "hinted")
