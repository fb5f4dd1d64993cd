"""A column-based pyfunc over text, integer, boolean and float columns, returning a table."""

import pandas as pd
from mlflow.pyfunc import PythonModel

import mlflow


class MixedModel(PythonModel):
    def predict(self, context, model_input, params=None):
        label = model_input["name"].str.upper() + ":" + model_input["count"].astype(str)
        score = model_input["ratio"].astype("float64") * model_input["flag"].astype("float64")
        return pd.DataFrame({"label": label, "score": score, "flag": model_input["flag"]})


mlflow.models.set_model(MixedModel())
