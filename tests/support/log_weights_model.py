"""Registers a version of a model whose artifacts hold one big weights file.

Run as a separate process (see ``big_models.log_weights_model``) so that MLflow's process-wide
state never leaks into the caller. Prints one JSON line last: the logged model's ``source``,
``run_id`` and ``model_id``, and the ``version`` it was registered as (None with
``--no-register``: a benchmark registers it itself, to time from the registration on).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import pandas as pd

import mlflow

CODE = Path(__file__).resolve().parent / "big_model_code" / "weights_model.py"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--weights", required=True, type=Path)
    parser.add_argument("--marker", default="", help="changes MLmodel: a small file of the model")
    parser.add_argument("--no-register", action="store_true")
    args = parser.parse_args()
    requirements = [
        f"{dist}=={importlib.metadata.version(dist)}" for dist in ("mlflow", "numpy", "pandas")
    ]
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(CODE),
            artifacts={"weights": str(args.weights)},
            model_config={"marker": args.marker},
            input_example=pd.DataFrame({"x": [1.0, 2.0]}),
            pip_requirements=requirements,
            registered_model_name=None if args.no_register else args.name,
        )
    version = info.registered_model_version
    print(
        json.dumps(
            {
                "version": None if version is None else str(version),
                "source": info.model_uri,
                "run_id": info.run_id,
                "model_id": info.model_id,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
