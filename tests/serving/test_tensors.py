"""The wire format on its own: decoding requests and encoding responses (no model, no server)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mlflow_dock.serving.server.errors import ProtocolError
from mlflow_dock.serving.server.tensors import (
    OutputTensor,
    datatype_of,
    encode_response,
    parse_header_length,
    parse_request,
)


def request(*inputs, **extra):
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def with_binary(header, *blobs):
    text = json.dumps(header).encode()
    return b"".join([text, *blobs]), len(text)


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        ("bool", "BOOL"),
        ("uint8", "UINT8"),
        ("uint64", "UINT64"),
        ("int8", "INT8"),
        ("int16", "INT16"),
        ("int32", "INT32"),
        ("int64", "INT64"),
        ("float16", "FP16"),
        ("float32", "FP32"),
        ("float64", "FP64"),
        ("object", "BYTES"),
        ("<U3", "BYTES"),
        ("S3", "BYTES"),
        ("complex64", "BYTES"),
    ],
)
def test_datatypes(dtype, datatype):
    assert datatype_of(np.dtype(dtype)) == datatype


def test_json_tensors_flat_nested_and_scalar():
    parsed = parse_request(
        request(
            {"name": "a", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]},
            {"name": "b", "datatype": "FP64", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
            {"name": "c", "datatype": "BYTES", "shape": [1, 2], "data": [["x", "y"]]},
            {"name": "d", "datatype": "BOOL", "shape": [], "data": [True]},
            id="7",
        ),
        None,
    )
    a, b, c, d = parsed.inputs
    assert a.array.dtype == np.int32 and a.array.tolist() == [[1, 2], [3, 4]]
    assert b.array.dtype == np.float64 and b.array.shape == (2, 2)
    assert c.array.dtype == object and c.array.tolist() == [["x", "y"]]
    assert d.array.shape == () and d.array.item() is True
    assert parsed.id == "7" and parsed.outputs is None and not parsed.binary_outputs


def test_binary_tensors_of_every_kind():
    fp16 = np.array([0.5, -2.0], np.float16)
    words = [b"", b"\xff\x00", "été".encode()]
    packed = b"".join(struct.pack("<I", len(w)) + w for w in words)
    header = {
        "inputs": [
            {"name": "h", "datatype": "FP16", "shape": [2], "parameters": {"binary_data_size": 4}},
            {"name": "b", "datatype": "BOOL", "shape": [3], "parameters": {"binary_data_size": 3}},
            {
                "name": "s",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(packed)},
            },
            {"name": "j", "datatype": "UINT16", "shape": [1], "data": [9]},
        ],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "h", "parameters": {"binary_data": False}}, {"name": "s"}],
    }
    body, length = with_binary(
        header,
        fp16.astype("<f2").tobytes(),
        b"\x01\x00\x01",
        packed,
    )
    parsed = parse_request(body, length)
    h, b, s, j = parsed.inputs
    assert h.array.tolist() == [0.5, -2.0] and h.array.flags.writeable
    assert b.array.tolist() == [True, False, True]
    assert s.array.tolist() == words
    assert j.array.tolist() == [9]
    assert parsed.binary_outputs
    assert [(o.name, o.binary) for o in parsed.outputs] == [("h", False), ("s", None)]


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (struct.pack("<I", 5) + b"abc", "runs past"),
        (struct.pack("<I", 1) + b"a" + b"\x00\x00", "end before element 1"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) + b"z", "more than"),
    ],
)
def test_malformed_binary_bytes(blob, fragment):
    header = {
        "inputs": [
            {
                "name": "s",
                "datatype": "BYTES",
                "shape": [2] if "more" in fragment or "before" in fragment else [1],
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    with pytest.raises(ProtocolError, match=fragment):
        parse_request(*with_binary(header, blob))


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        ({"datatype": "FP32", "shape": [1], "data": [1]}, "'name'"),
        ({"name": "x", "datatype": "FP32", "shape": [True], "data": [1]}, "shape"),
        ({"name": "x", "datatype": "FP32", "shape": [1]}, "neither 'data'"),
        ({"name": "x", "datatype": "FP32", "shape": [1], "data": 1}, "JSON array"),
        ({"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]}, "not all UINT8"),
        ({"name": "x", "datatype": "BYTES", "shape": [2], "data": [["a"], ["b", "c"]]}, "nested"),
        ({"name": "x", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}, "fill"),
        (
            {"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}},
            "does not fit",
        ),
        ({"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": 3}, "object"),
    ],
)
def test_malformed_tensors(tensor, fragment):
    with pytest.raises(ProtocolError, match=fragment) as caught:
        parse_request(request(tensor), None)
    assert caught.value.status == 400


def test_header_length():
    assert parse_header_length(None, 10) is None
    assert parse_header_length("10", 10) == 10
    for bad in ("-1", "11", "ten"):
        with pytest.raises(ProtocolError):
            parse_header_length(bad, 10)


def test_json_response_of_every_kind():
    outputs = [
        OutputTensor("f", "FP32", np.array([[0.5, 1.5]], np.float32)),
        OutputTensor("b", "BOOL", np.array([True, False])),
        OutputTensor("u", "BYTES", np.array(["a", "é"])),
        OutputTensor(
            "o", "BYTES", np.array([b"\x00\x01", None, float("nan"), {"k": 1}, 3], object)
        ),
    ]
    body, length = encode_response({"model_name": "m", "id": "1"}, [(o, False) for o in outputs])
    assert length is None
    answer = json.loads(body)
    assert answer["model_name"] == "m" and answer["id"] == "1"
    assert [(o["name"], o["shape"], o["data"]) for o in answer["outputs"]] == [
        ("f", [1, 2], [0.5, 1.5]),
        ("b", [2], [True, False]),
        ("u", [2], ["a", "é"]),
        ("o", [5], ["AAE=", None, None, '{"k": 1}', "3"]),
    ]


def test_binary_response_appends_tensors_in_order():
    outputs = [
        (OutputTensor("i", "INT64", np.arange(3, dtype=np.int64)[::-1]), True),  # not contiguous
        (OutputTensor("j", "INT32", np.array([7], np.int32)), False),
        (OutputTensor("s", "BYTES", np.array(["ab", b"\xff"], object)), True),
    ]
    body, length = encode_response({"model_name": "m"}, outputs)
    header = json.loads(body[:length])
    i, j, s = header["outputs"]
    assert i["parameters"] == {"binary_data_size": 24} and "data" not in i
    assert j["data"] == [7] and "parameters" not in j
    blob = body[length:]
    assert np.frombuffer(blob[:24], "<i8").tolist() == [2, 1, 0]
    assert blob[24:] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"\xff"
    assert s["parameters"]["binary_data_size"] == len(blob) - 24
