"""A column-based pyfunc whose predictions depend on its params (ParamSchema: scale, tag)."""

from mlflow.pyfunc import PythonModel

import mlflow


class ParamsModel(PythonModel):
    def predict(self, context, model_input, params=None):
        params = params or {}
        return (model_input["a"] * params["scale"] + len(params["tag"])).to_numpy()


mlflow.models.set_model(ParamsModel())
