"""A pyfunc whose signature MLflow infers from its type hints (list[str] in, list[str] out)."""

from mlflow.pyfunc import PythonModel

import mlflow


class ShoutModel(PythonModel):
    def predict(self, model_input: list[str], params=None) -> list[str]:
        return [text.upper() for text in model_input]


mlflow.models.set_model(ShoutModel())
