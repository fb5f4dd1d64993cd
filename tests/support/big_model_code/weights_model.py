"""A model whose weights are one big file it never reads when it loads (models-from-code).

Loading only stats the file, as a model that memory-maps its weights would: serving it costs no
memory for the weights, so tests and benchmarks of big models measure the builder, not the model.
"""

import os

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class WeightsModel(PythonModel):
    def load_context(self, context):
        self.size = os.stat(context.artifacts["weights"]).st_size
        self.marker = (context.model_config or {}).get("marker", "")

    def predict(self, context, model_input, params=None):
        rows = len(model_input)
        return pd.DataFrame({"weights_bytes": [self.size] * rows, "marker": [self.marker] * rows})


set_model(WeightsModel())
