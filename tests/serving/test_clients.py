"""The serving layer as an image runs it (`python -m mlflow_dock_serving` from the layer's files,
`mlflow_dock` not importable), driven over HTTP by Triton's and KServe's V2 clients.

Not the final proof (that is an image built through a webhook, in tests/integration): this
shows the real clients agree with the server, binary and JSON, and with /invocations.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from support import web
from support.oip import columns_as_tensors, infer_with_kserve, infer_with_tritonclient
from support.servers import ModelServer, start_model_server
from support.v2_models import IRIS_COLUMNS, MODEL_NAME, MODEL_VERSION


@pytest.fixture(scope="module")
def iris_server(model_paths, tmp_path_factory) -> Iterator[ModelServer]:
    server = start_model_server(
        model_paths["iris"],
        tmp_path_factory.mktemp("iris-server"),
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tensor_server(model_paths, tmp_path_factory) -> Iterator[ModelServer]:
    server = start_model_server(
        model_paths["tensor"],
        tmp_path_factory.mktemp("tensor-server"),
        model_name="tensors",
        model_version="1",
    )
    yield server
    server.stop()


def iris_frame(rows):
    import pandas as pd
    from sklearn.datasets import load_iris

    features, _ = load_iris(return_X_y=True)
    picked = features[np.random.default_rng(11).integers(0, len(features), rows)]
    return pd.DataFrame(picked, columns=list(IRIS_COLUMNS))


def invocations(url, payload):
    response = web.post(f"{url}/invocations", json=payload, timeout=30)
    response.raise_for_status()
    return response.json()["predictions"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_against_the_iris_model(iris_server, binary):
    frame = iris_frame(100)
    expected = invocations(iris_server.url, {"dataframe_split": frame.to_dict(orient="split")})
    answer = infer_with_tritonclient(
        iris_server.url,
        MODEL_NAME,
        columns_as_tensors(frame),
        version=MODEL_VERSION,
        binary=binary,
        request_id="r-7",
    )
    assert answer.outputs["output-0"].tolist() == expected
    assert (answer.request_id, answer.model_version) == ("r-7", MODEL_VERSION)
    assert [t["name"] for t in answer.metadata["inputs"]] == list(IRIS_COLUMNS)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_client_against_the_iris_model(iris_server, binary):
    frame = iris_frame(1)
    expected = invocations(iris_server.url, {"dataframe_split": frame.to_dict(orient="split")})
    answer = infer_with_kserve(
        iris_server.url, MODEL_NAME, columns_as_tensors(frame), binary=binary, request_id="k-1"
    )
    assert answer.outputs["output-0"].tolist() == expected
    assert answer.request_id == "k-1"


def test_both_clients_against_a_tensor_model(tensor_server):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    expected = invocations(tensor_server.url, {"inputs": {"x": x.tolist()}})
    triton = infer_with_tritonclient(tensor_server.url, "tensors", {"x": x}, outputs=["scaled"])
    assert list(triton.outputs) == ["scaled"]
    assert triton.outputs["scaled"].dtype == np.float32
    assert triton.outputs["scaled"].tolist() == expected["scaled"]
    kserve = infer_with_kserve(tensor_server.url, "tensors", {"x": x})
    assert kserve.outputs["sum"].tolist() == expected["sum"]
    assert kserve.outputs["scaled"].shape == (4, 3)


def test_ping_still_answers_as_mlflow(iris_server):
    response = web.get(f"{iris_server.url}/ping", timeout=10)
    assert (response.status_code, response.text) == (200, "\n")


def test_another_model_name_is_not_ready(iris_server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=iris_server.url.removeprefix("http://"))
    try:
        assert not client.is_model_ready("someone-else")
    finally:
        client.close()
