"""The model server every serving image runs, and the image layer that carries it.

`server/` is the server itself: MLflow's scoring app (`/ping`, `/invocations`, unchanged) plus
the Open Inference Protocol ("V2") REST API. It runs inside the image, in the model's own
virtualenv, as the package `mlflow_dock_serving`, so it imports nothing else of ours (an
import-linter contract checks that) and uses only relative imports within itself.
`layer.py` is the builder's side: the files of that layer, its command and environment.
"""
