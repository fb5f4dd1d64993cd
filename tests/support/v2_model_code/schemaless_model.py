"""A pyfunc logged without a signature: it returns what it was given."""

from mlflow.pyfunc import PythonModel

import mlflow


class EchoModel(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(EchoModel())
