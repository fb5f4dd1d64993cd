"""The V2 routes, in-process, against real MLflow models; /invocations as the reference answer."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest

from support.v2_models import IRIS_COLUMNS, MODEL_NAME, MODEL_VERSION

INFER = f"/v2/models/{MODEL_NAME}/infer"
INFER_VERSIONED = f"/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"


def tensor(name, datatype, shape, data, **parameters):
    described = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    if parameters:
        described["parameters"] = parameters
    return described


def iris_rows(count):
    from sklearn.datasets import load_iris

    features, _ = load_iris(return_X_y=True)
    return features[np.random.default_rng(7).integers(0, len(features), count)]


def iris_request(rows, **extra):
    inputs = [
        tensor(column, "FP64", [len(rows)], rows[:, index].tolist())
        for index, column in enumerate(IRIS_COLUMNS)
    ]
    return {"inputs": inputs, **extra}


def invocations(client, payload):
    response = client.post("/invocations", json=payload)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def output(response, name):
    assert response.status_code == 200, response.text
    (found,) = [o for o in response.json()["outputs"] if o["name"] == name]
    return found


def binary_body(header, *blobs):
    text = json.dumps(header).encode()
    return b"".join([text, *blobs]), {"Inference-Header-Content-Length": str(len(text))}


def split_binary(response):
    length = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:length]), response.content[length:]


# --------------------------------------------------------------------------- health, metadata


def test_health_and_server_metadata(serve):
    client = serve("iris")
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{MODEL_NAME}/ready").json() == {
        "name": MODEL_NAME,
        "ready": True,
    }
    assert client.get(f"/v2/models/{MODEL_NAME}/versions/3/ready").status_code == 200
    server = client.get("/v2").json()
    assert server["name"] == "mlflow-dock"
    assert server["extensions"] == ["binary_tensor_data"]


def test_column_signature_metadata(serve):
    metadata = serve("iris").get(f"/v2/models/{MODEL_NAME}").json()
    assert metadata == {
        "name": MODEL_NAME,
        "versions": [MODEL_VERSION],
        "platform": "mlflow",
        "inputs": [{"name": c, "datatype": "FP64", "shape": [-1]} for c in IRIS_COLUMNS],
        "outputs": [{"name": "output-0", "datatype": "INT64", "shape": [-1]}],
    }
    assert serve("iris").get(f"/v2/models/{MODEL_NAME}/versions/3").json() == metadata


def test_mixed_column_types_metadata(serve):
    metadata = serve("mixed").get(f"/v2/models/{MODEL_NAME}").json()
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [
        ("name", "BYTES"),
        ("count", "INT64"),
        ("flag", "BOOL"),
        ("ratio", "FP32"),
    ]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [
        ("label", "BYTES"),
        ("score", "FP64"),
        ("flag", "BOOL"),
    ]


def test_tensor_signature_metadata(serve):
    metadata = serve("tensor").get(f"/v2/models/{MODEL_NAME}").json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["outputs"] == [
        {"name": "sum", "datatype": "FP32", "shape": [-1]},
        {"name": "scaled", "datatype": "FP32", "shape": [-1, 3]},
    ]


def test_model_without_signature_says_what_is_unknown(serve):
    metadata = serve("schemaless", version=None).get(f"/v2/models/{MODEL_NAME}").json()
    assert "versions" not in metadata
    assert metadata["inputs"] == [] and metadata["outputs"] == []
    assert metadata["parameters"]["inputs"].startswith("unknown")
    assert metadata["parameters"]["outputs"].startswith("unknown")


def test_signature_from_type_hints_metadata(serve):
    metadata = serve("hinted").get(f"/v2/models/{MODEL_NAME}").json()
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("rows", [1, 100])
def test_column_model_infer_equals_invocations(serve, rows):
    client = serve("iris")
    features = iris_rows(rows)
    expected = invocations(
        client, {"dataframe_split": {"columns": list(IRIS_COLUMNS), "data": features.tolist()}}
    )
    response = client.post(INFER_VERSIONED, json=iris_request(features, id="req-1"))
    body = response.json()
    assert body["model_name"] == MODEL_NAME
    assert body["model_version"] == MODEL_VERSION
    assert body["id"] == "req-1"
    assert output(response, "output-0") == {
        "name": "output-0",
        "datatype": "INT64",
        "shape": [rows],
        "data": expected,
    }


def test_column_inputs_take_n_by_1_shapes_and_nested_data(serve):
    client = serve("iris")
    features = iris_rows(5)
    flat = client.post(INFER, json=iris_request(features))
    nested = {
        "inputs": [
            tensor(c, "FP32", [5, 1], [[v] for v in features[:, i].tolist()])
            for i, c in enumerate(IRIS_COLUMNS)
        ]
    }
    assert output(client.post(INFER, json=nested), "output-0") == output(flat, "output-0")


def test_tensor_model_infer_equals_invocations(serve):
    client = serve("tensor")
    x = [[1.5, 2.0, 3.0], [4.0, 5.0, 6.25]]
    expected = invocations(client, {"inputs": {"x": x}})
    response = client.post(
        INFER, json={"inputs": [tensor("x", "FP32", [2, 3], [v for row in x for v in row])]}
    )
    assert output(response, "sum")["data"] == expected["sum"]
    scaled = output(response, "scaled")
    assert (scaled["datatype"], scaled["shape"]) == ("FP32", [2, 3])
    assert np.reshape(scaled["data"], (2, 3)).tolist() == expected["scaled"]


def test_requested_outputs_filter_and_binary_output(serve):
    client = serve("tensor")
    request = {
        "inputs": [tensor("x", "FP32", [1, 3], [1, 2, 3])],
        "outputs": [{"name": "scaled", "parameters": {"binary_data": True}}],
    }
    response = client.post(INFER, json=request)
    assert response.headers["content-type"] == "application/octet-stream"
    header, blob = split_binary(response)
    (only,) = header["outputs"]
    assert only["name"] == "scaled" and "data" not in only
    assert only["parameters"] == {"binary_data_size": len(blob)}
    assert np.frombuffer(blob, "<f4").tolist() == [2.0, 4.0, 6.0]


def test_request_level_binary_output(serve):
    client = serve("iris")
    request = iris_request(iris_rows(3), parameters={"binary_data_output": True})
    header, blob = split_binary(client.post(INFER, json=request))
    json_answer = output(client.post(INFER, json=iris_request(iris_rows(3))), "output-0")
    assert np.frombuffer(blob, "<i8").tolist() == json_answer["data"]
    assert header["outputs"][0]["shape"] == [3]


def test_binary_inputs_equal_json_inputs(serve):
    client = serve("mixed")
    names = ["ab", "ü"]
    header = {
        "inputs": [
            {"name": "name", "datatype": "BYTES", "shape": [2], "parameters": {}},
            {"name": "count", "datatype": "INT64", "shape": [2]},
            {"name": "flag", "datatype": "BOOL", "shape": [2]},
            {"name": "ratio", "datatype": "FP32", "shape": [2]},
        ]
    }
    blobs = [
        b"".join(struct.pack("<I", len(n.encode())) + n.encode() for n in names),
        np.array([3, 4], "<i8").tobytes(),
        np.array([True, False]).tobytes(),
        np.array([0.5, 2.0], "<f4").tobytes(),
    ]
    for described, blob in zip(header["inputs"], blobs, strict=True):
        described["parameters"] = {"binary_data_size": len(blob)}
    content, headers = binary_body(header, *blobs)
    binary = client.post(INFER, content=content, headers=headers)
    as_json = client.post(
        INFER,
        json={
            "inputs": [
                tensor("name", "BYTES", [2], names),
                tensor("count", "INT64", [2], [3, 4]),
                tensor("flag", "BOOL", [2], [True, False]),
                tensor("ratio", "FP32", [2], [0.5, 2.0]),
            ]
        },
    )
    assert binary.json() == as_json.json()
    assert output(binary, "label") == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["AB:3", "Ü:4"],
    }
    assert output(binary, "score")["data"] == [0.5, 0.0]
    assert output(binary, "flag") == {
        "name": "flag",
        "datatype": "BOOL",
        "shape": [2],
        "data": [True, False],
    }


def test_binary_bytes_output(serve):
    client = serve("mixed")
    request = {
        "inputs": [
            tensor("name", "BYTES", [1], ["x"]),
            tensor("count", "INT64", [1], [1]),
            tensor("flag", "BOOL", [1], [True]),
            tensor("ratio", "FP32", [1], [1.0]),
        ],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
    }
    _, blob = split_binary(client.post(INFER, json=request))
    assert blob == struct.pack("<I", 3) + b"X:1"


def test_params_reach_the_model_as_in_invocations(serve):
    client = serve("params")
    params = {"scale": 3.0, "tag": "abcd"}
    expected = invocations(
        client, {"dataframe_split": {"columns": ["a"], "data": [[1.0], [2.0]]}, "params": params}
    )
    request = {
        "inputs": [tensor("a", "FP64", [2], [1.0, 2.0])],
        # binary_data_output is the protocol's: it never reaches the model's params.
        "parameters": {**params, "binary_data_output": False},
    }
    assert output(client.post(INFER, json=request), "output-0")["data"] == expected == [7.0, 10.0]
    defaults = {"inputs": [tensor("a", "FP64", [1], [2.0])]}
    assert output(client.post(INFER, json=defaults), "output-0")["data"] == [3.0]


def test_model_without_signature_takes_named_tensors_as_a_frame(serve):
    client = serve("schemaless", version=None)
    request = {"inputs": [tensor("a", "INT32", [2], [1, 2]), tensor("b", "BYTES", [2], ["x", "y"])]}
    response = client.post(INFER, json=request)
    assert output(response, "a") == {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]}
    assert output(response, "b")["data"] == ["x", "y"]
    assert "model_version" not in response.json()
    as_array = {
        "inputs": [tensor("m", "FP64", [2, 2], [1, 2, 3, 4])],
        "parameters": {"content_type": "np"},
    }
    echoed = output(client.post(INFER, json=as_array), "output-0")
    assert (echoed["shape"], echoed["data"]) == ([2, 2], [1.0, 2.0, 3.0, 4.0])


def test_type_hinted_model(serve):
    client = serve("hinted")
    response = client.post(INFER, json={"inputs": [tensor("input-0", "BYTES", [2], ["a", "b"])]})
    assert output(response, "output-0")["data"] == invocations(client, {"inputs": ["a", "b"]})


# --------------------------------------------------------------------------- MLflow's own routes


def test_ping_and_invocations_stay_mlflows(serve, loaded):
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    ours = serve("iris")
    theirs = TestClient(scoring_server.init(loaded("iris")))
    for path in ("/ping", "/health", "/version"):
        mine, reference = ours.get(path), theirs.get(path)
        assert (mine.status_code, mine.content, mine.headers["content-type"]) == (
            reference.status_code,
            reference.content,
            reference.headers["content-type"],
        )
    payload = {"dataframe_split": {"columns": list(IRIS_COLUMNS), "data": iris_rows(4).tolist()}}
    assert (
        ours.post("/invocations", json=payload).content
        == theirs.post("/invocations", json=payload).content
    )
    bad = ours.post("/invocations", content=b"a,b\n1,2", headers={"content-type": "text/plain"})
    assert (
        bad.status_code
        == theirs.post(
            "/invocations", content=b"a,b\n1,2", headers={"content-type": "text/plain"}
        ).status_code
        == 415
    )


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/models/other", 404),
        ("/v2/models/other/infer", 404),
        (f"/v2/models/{MODEL_NAME}/versions/4", 404),
        (f"/v2/models/{MODEL_NAME}/versions/4/ready", 404),
        ("/v2/repository/index", 404),
        ("/v2/", 404),
    ],
)
def test_unknown_models_versions_and_paths(serve, path, status):
    response = serve("iris").get(path)
    assert response.status_code == status
    assert set(response.json()) == {"error"}


def test_a_server_without_version_knows_no_versions(serve):
    client = serve("iris", version=None)
    assert client.get(f"/v2/models/{MODEL_NAME}/versions/3").status_code == 404
    assert "model_version" not in client.post(INFER, json=iris_request(iris_rows(1))).json()


def test_wrong_methods(serve):
    client = serve("iris")
    assert client.get(INFER).status_code == 405
    assert client.post(f"/v2/models/{MODEL_NAME}").status_code == 405
    assert client.post("/v2/health/live").json()["error"]


def good_iris_inputs():
    return iris_request(iris_rows(2))["inputs"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not a JSON object"),
        (b"[]", "must be a JSON object"),
        (json.dumps({"inputs": []}).encode(), "non-empty list"),
        (json.dumps({"inputs": good_iris_inputs(), "id": 7}).encode(), "'id' must be a string"),
        (
            json.dumps({"inputs": [tensor("sepal length (cm)", "FP99", [1], [1.0])]}).encode(),
            "datatype 'FP99'",
        ),
        (
            json.dumps({"inputs": [tensor("sepal length (cm)", "FP64", [3], [1.0])]}).encode(),
            "do not fill the shape",
        ),
        (
            json.dumps({"inputs": [tensor("sepal length (cm)", "FP64", [-1], [1.0])]}).encode(),
            "non-negative integers",
        ),
        (
            json.dumps({"inputs": [tensor("sepal length (cm)", "INT8", [1], [300])]}).encode(),
            "not all INT8",
        ),
        (
            json.dumps({"inputs": [tensor("sepal length (cm)", "FP64", [1], ["x"])]}).encode(),
            "not all FP64",
        ),
        (
            json.dumps(
                {"inputs": [*good_iris_inputs(), tensor("extra", "FP64", [2], [1, 2])]}
            ).encode(),
            "unknown inputs ['extra']",
        ),
        (
            json.dumps({"inputs": good_iris_inputs()[:3]}).encode(),
            "petal width (cm)",  # MLflow's schema enforcement names the missing column
        ),
        (
            json.dumps({"inputs": good_iris_inputs(), "outputs": [{"name": "proba"}]}).encode(),
            "unknown output 'proba'",
        ),
        (
            json.dumps({"inputs": [good_iris_inputs()[0], good_iris_inputs()[0]]}).encode(),
            "repeat",
        ),
    ],
)
def test_bad_requests_answer_400_with_a_reason(serve, body, fragment):
    response = serve("iris").post(INFER, content=body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_tensor_datatype_must_match_the_signature(serve):
    response = serve("tensor").post(
        INFER, json={"inputs": [tensor("x", "FP64", [1, 3], [1, 2, 3])]}
    )
    assert response.status_code == 400
    assert "float32" in response.json()["error"]


@pytest.mark.parametrize(
    ("length", "blob", "fragment"),
    [
        ("abc", b"", "not a number"),
        ("100000", b"", "does not fit a body"),
        (None, b"\x00" * 7, "binary_data_size"),
        (None, b"\x00" * 9, "no input claims"),
    ],
)
def test_bad_binary_requests(serve, length, blob, fragment):
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}
        ]
    }
    content, headers = binary_body(header, blob)
    if length is not None:
        headers["Inference-Header-Content-Length"] = length
    response = serve("tensor").post(INFER, content=content, headers=headers)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_params_that_do_not_fit_the_param_schema_are_a_400(serve):
    request = {"inputs": [tensor("a", "FP64", [1], [1.0])], "parameters": {"scale": "many"}}
    response = serve("params").post(INFER, json=request)
    assert response.status_code == 400
    assert "scale" in response.json()["error"]


class BrokenModel:
    """The iris model's metadata, with a predict() that fails as buggy model code does."""

    def __init__(self, model):
        self.metadata = model.metadata

    def predict(self, data, params=None):
        raise KeyError("no such feature")


def test_an_error_inside_the_model_is_a_400_with_the_reason(serve, loaded):
    response = serve(BrokenModel(loaded("iris"))).post(INFER, json=iris_request(iris_rows(1)))
    assert response.status_code == 400
    assert "KeyError: 'no such feature'" in response.json()["error"]


class SlowModel:
    """The iris model, slower than the server's request timeout."""

    def __init__(self, model):
        self.metadata = model.metadata
        self._model = model

    def predict(self, data, params=None):
        time.sleep(0.5)
        return self._model.predict(data, params=params)


def test_requests_past_the_timeout_answer_504(serve, loaded):
    client = serve(SlowModel(loaded("iris")), timeout=0.05)
    response = client.post(INFER, json=iris_request(iris_rows(1)))
    assert response.status_code == 504
    assert "longer than" in response.json()["error"]
