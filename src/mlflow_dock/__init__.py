"""mlflow-dock."""
