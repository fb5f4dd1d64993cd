"""A tensor-based pyfunc (MLflow models-from-code): named float32 tensor in, two tensors out."""

from mlflow.pyfunc import PythonModel

import mlflow


class TensorModel(PythonModel):
    def predict(self, context, model_input, params=None):
        x = model_input["x"]
        return {"sum": x.sum(axis=1), "scaled": x * 2}


mlflow.models.set_model(TensorModel())
