"""mlflow-dock's model server: MLflow's scoring protocol and the Open Inference Protocol (V2).

Inside a serving image this package is `mlflow_dock_serving` (see `mlflow_dock.serving.layer`);
it runs on the model's virtualenv (mlflow-skinny, FastAPI/Starlette, uvicorn, numpy, pandas and
the model's requirements) and needs nothing else. Modules import each other relatively only,
and nothing here loads a model or reads the environment at import time.
"""
