"""mlflow-dock: MLflow Model Registry events -> serving images in a container registry.

Entry points: `mlflow_dock.cli` (the `mlflow-dock` command), `mlflow_dock.intake.api.create_app`
(an ASGI app from Settings) and `mlflow_dock.asgi:app` (settings from the environment).
"""

__version__ = "0.1.0"
