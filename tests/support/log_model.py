"""Registers a small model version in the MLflow server named by MLFLOW_TRACKING_URI.

Run as a separate process (see ``servers.log_sklearn_model``) so that MLflow's process-wide
state (tracking URI, active run, autologging) never leaks into the test process.
Prints one JSON line ``{"version": "N", ...}`` as the last line of stdout.

``--serve`` keeps one process for many versions (``servers.ModelLoggers``): importing mlflow
and scikit-learn costs 4-11 s of CPU, paid once instead of once per version. Each stdin line
is a request ``{"argv": [...], "tracking_uri": "..."}``; each answer is one stdout line
starting with ``@@result `` or ``@@error `` followed by JSON (other libraries may print too).
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Any

from mlflow.pyfunc.model import PythonModel, PythonModelContext

import mlflow


class BrokenModel(PythonModel):
    """Logs fine, but fails whenever a serving process loads it."""

    def load_context(self, context: PythonModelContext) -> None:
        raise RuntimeError("mlflow-dock test model: deliberately broken at load time")

    def predict(self, context: object, model_input: object, params: object = None) -> object:
        raise RuntimeError("mlflow-dock test model: deliberately broken")


def _in_an_image() -> bool:
    # The adversarial models below act only where mlflow-dock runs them (a serving image or a
    # warm smoke container), never in the process that logs them.
    return os.path.isdir("/opt/ml/model")


class ProbeModel(PythonModel):
    """Tries to connect to ``targets`` when loaded and answers with what happened to each."""

    def __init__(self, targets: dict[str, list[Any]]) -> None:
        self.targets = targets
        self.seen: list[str] = []

    def load_context(self, context: PythonModelContext) -> None:
        if not _in_an_image():
            return
        for name, (host, port) in self.targets.items():
            try:
                with socket.create_connection((host, int(port)), timeout=3):
                    outcome = "CONNECTED"
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self.seen.append(f"{name}={outcome}")

    def predict(self, context: object, model_input: object, params: object = None) -> object:
        return self.seen


class MemoryHog(PythonModel):
    """Touches 1 GiB when loaded."""

    def load_context(self, context: PythonModelContext) -> None:
        if _in_an_image():
            self.blob = b"\x01" * 1024**3

    def predict(self, context: object, model_input: object, params: object = None) -> object:
        return [0]


class Sleeper(PythonModel):
    """Never finishes loading."""

    def load_context(self, context: PythonModelContext) -> None:
        while _in_an_image():
            time.sleep(3600)

    def predict(self, context: object, model_input: object, params: object = None) -> object:
        return [0]


def pinned(*distributions: str) -> list[str]:
    """Requirements pinned to what is installed here, as MLflow's inference would write."""
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in distributions]


V2_KINDS = ("tensor", "params")


RESULT = "@@result "
ERROR = "@@error "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true", help="answer requests from stdin")
    parser.add_argument("--name")
    parser.add_argument("--broken", action="store_true")
    parser.add_argument(
        "--pyfunc",
        choices=("probe", "hog", "sleeper", *V2_KINDS),
        help="an adversarial pyfunc model instead (see ProbeModel, MemoryHog, Sleeper), or a"
        " models-from-code pyfunc of tests/support/v2_model_code (signature included)",
    )
    parser.add_argument("--probe-targets", default="{}", help="JSON {name: [host, port]}")
    parser.add_argument("--no-input-example", action="store_true")
    parser.add_argument(
        "--requirements",
        help="JSON list of pip requirements; 'infer' lets MLflow infer them (slow, ~13s)",
    )
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.serve:
        return serve(parser)
    if not args.name:
        parser.error("--name is required")
    print(json.dumps(log_version(args)))
    return 0


def serve(parser: argparse.ArgumentParser) -> int:
    home = os.getcwd()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            args = parser.parse_args(request["argv"])
            mlflow.set_tracking_uri(request["tracking_uri"])
            # A fresh working directory per version, as a new process had: MLflow must not
            # pick up files another version's logging left behind.
            with tempfile.TemporaryDirectory(prefix="mlflow-dock-log-model-") as cwd:
                os.chdir(cwd)
                try:
                    result = log_version(args)
                finally:
                    os.chdir(home)
            print(RESULT + json.dumps(result), flush=True)
        except (Exception, SystemExit):  # SystemExit: argparse's way of refusing an argv
            print(ERROR + json.dumps({"error": traceback.format_exc()[-5000:]}), flush=True)
    return 0


def log_version(args: argparse.Namespace) -> dict[str, str]:
    """Log and register one version as ``args`` say; what the caller prints."""
    if args.requirements == "infer":
        requirements = None
    elif args.requirements:
        requirements = json.loads(args.requirements)
    elif args.broken or (args.pyfunc and args.pyfunc not in V2_KINDS):
        requirements = pinned("mlflow", "cloudpickle", "numpy", "pandas")
    else:
        # The set MLflow 3.17 infers for this model, minus the test-process noise it also picks
        # up (pytest, rich); skops because 3.17 saves sklearn models as model.skops by default.
        # The V2 pyfuncs get it too: they are versions of the sklearn model's runtime, assembled
        # on its image (test_open_inference).
        requirements = pinned("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")

    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, target = load_iris(return_X_y=True, as_frame=True)
    example = features.head(3) if not args.no_input_example else None

    if args.pyfunc in V2_KINDS:
        return log_pyfunc(args.name, args.pyfunc, requirements)

    with mlflow.start_run():
        if args.broken or args.pyfunc:
            from mlflow.models import infer_signature

            # An explicit signature keeps MLflow from calling predict() on the model while
            # logging, which would need load_context() and so could never succeed.
            signature = infer_signature(features.head(3), target.head(3).to_numpy())
            python_model: PythonModel = {
                "probe": lambda: ProbeModel(json.loads(args.probe_targets)),
                "hog": MemoryHog,
                "sleeper": Sleeper,
                None: BrokenModel,
            }[args.pyfunc]()
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model,
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
    return {"version": str(version), "model_uri": info.model_uri}


def log_pyfunc(name: str, kind: str, requirements: list[str] | None) -> dict[str, str]:
    """A tensor-based pyfunc, or a column-based one with params, as tests/support/v2_models.py
    saves them, registered as a version of `name`."""
    from pathlib import Path

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    if kind == "tensor":
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3), "x")]),
            outputs=Schema(
                [
                    TensorSpec(np.dtype("float32"), (-1,), "sum"),
                    TensorSpec(np.dtype("float32"), (-1, 3), "scaled"),
                ]
            ),
        )
        example: object = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    else:
        signature = ModelSignature(
            inputs=Schema([ColSpec("double", "a")]),
            outputs=Schema([ColSpec("double")]),
            params=ParamSchema(
                [ParamSpec("scale", "double", 1.0), ParamSpec("tag", "string", "x")]
            ),
        )
        import pandas as pd

        example = pd.DataFrame({"a": [1.0, 2.5]})
    code = Path(__file__).resolve().parent / "v2_model_code" / f"{kind}_model.py"
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            registered_model_name=name,
        )
    return {"version": str(info.registered_model_version), "model_uri": info.model_uri}


if __name__ == "__main__":
    sys.exit(main())
