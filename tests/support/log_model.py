"""Registers a small model version in the MLflow server named by MLFLOW_TRACKING_URI.

Run as a separate process (see ``servers.log_sklearn_model``) so that MLflow's process-wide
state (tracking URI, active run, autologging) never leaks into the test process.
Prints one JSON line ``{"version": "N", ...}`` as the last line of stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys

from mlflow.pyfunc.model import PythonModel, PythonModelContext

import mlflow


class BrokenModel(PythonModel):
    """Logs fine, but fails whenever a serving process loads it."""

    def load_context(self, context: PythonModelContext) -> None:
        raise RuntimeError("mlflow-dock test model: deliberately broken at load time")

    def predict(self, context: object, model_input: object, params: object = None) -> object:
        raise RuntimeError("mlflow-dock test model: deliberately broken")


def pinned(*distributions: str) -> list[str]:
    """Requirements pinned to what is installed here, as MLflow's inference would write."""
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in distributions]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--broken", action="store_true")
    parser.add_argument("--no-input-example", action="store_true")
    parser.add_argument(
        "--requirements",
        help="JSON list of pip requirements; 'infer' lets MLflow infer them (slow, ~13s)",
    )
    args = parser.parse_args()
    if args.requirements == "infer":
        requirements = None
    elif args.requirements:
        requirements = json.loads(args.requirements)
    elif args.broken:
        requirements = pinned("mlflow", "cloudpickle", "numpy", "pandas")
    else:
        # The set MLflow 3.17 infers for this model, minus the test-process noise it also picks
        # up (pytest, rich); skops because 3.17 saves sklearn models as model.skops by default.
        requirements = pinned("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")

    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, target = load_iris(return_X_y=True, as_frame=True)
    example = features.head(3) if not args.no_input_example else None

    with mlflow.start_run():
        if args.broken:
            from mlflow.models import infer_signature

            # An explicit signature keeps MLflow from calling predict() on the model while
            # logging, which would need load_context() and so could never succeed.
            signature = infer_signature(features.head(3), target.head(3).to_numpy())
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=BrokenModel(),
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
                registered_model_name=args.name,
            )
        else:
            model = LogisticRegression(max_iter=500).fit(features, target)
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                input_example=example,
                pip_requirements=requirements,
                registered_model_name=args.name,
            )

    version = info.registered_model_version
    print(json.dumps({"version": str(version), "model_uri": info.model_uri}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
