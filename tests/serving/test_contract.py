"""Signatures to V2 metadata, tensors to model inputs, predictions to outputs (no server)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import Array, DataType

from mlflow_dock.serving.server import contract
from mlflow_dock.serving.server.errors import ProtocolError
from mlflow_dock.serving.server.tensors import InputTensor


def tensor(name, datatype, values):
    return InputTensor(
        name, datatype, np.asarray(values, dtype=object if datatype == "BYTES" else None)
    )


def test_column_types():
    schema = Schema(
        [
            ColSpec(DataType.boolean, "b"),
            ColSpec(DataType.integer, "i"),
            ColSpec(DataType.long, "l"),
            ColSpec(DataType.float, "f"),
            ColSpec(DataType.double, "d"),
            ColSpec(DataType.string, "s"),
            ColSpec(DataType.binary, "r"),
            ColSpec(DataType.datetime, "t"),
            ColSpec(Array(DataType.long), "a", required=False),
        ]
    )
    described = contract.describe(schema, "input-")
    assert [(m.name, m.datatype, m.shape, m.elements) for m in described] == [
        ("b", "BOOL", (-1,), "text"),
        ("i", "INT32", (-1,), "text"),
        ("l", "INT64", (-1,), "text"),
        ("f", "FP32", (-1,), "text"),
        ("d", "FP64", (-1,), "text"),
        ("s", "BYTES", (-1,), "text"),
        ("r", "BYTES", (-1,), "raw"),
        ("t", "BYTES", (-1,), "text"),
        ("a", "BYTES", (-1,), "json"),
    ]
    assert described[-1].optional


def test_unnamed_specs_are_numbered():
    described = contract.describe(Schema([TensorSpec(np.dtype("uint8"), (-1, 28, 28))]), "input-")
    assert [(m.name, m.datatype, m.shape) for m in described] == [
        ("input-0", "UINT8", (-1, 28, 28))
    ]
    assert contract.describe(None, "input-") == ()


def test_bytes_elements_are_read_as_the_column_type_says():
    schema = Schema(
        [
            ColSpec(DataType.string, "s"),
            ColSpec(DataType.binary, "r"),
            ColSpec(Array(DataType.long), "a"),
        ]
    )
    frame = contract.assembler_for(schema).assemble(
        [
            tensor("s", "BYTES", [b"caf\xc3\xa9"]),
            tensor("r", "BYTES", ["AAE="]),  # base64 in JSON
            tensor("a", "BYTES", ["[1, 2]"]),
        ],
        {},
    )
    assert frame.loc[0, "s"] == "café"
    assert frame.loc[0, "r"] == b"\x00\x01"
    assert list(frame.loc[0, "a"]) == [1, 2]


@pytest.mark.parametrize(
    ("column", "values", "fragment"),
    [
        (ColSpec(DataType.string, "x"), [b"\xff"], "UTF-8"),
        (ColSpec(DataType.binary, "x"), ["not base64!"], "base64"),
        (ColSpec(Array(DataType.long), "x"), ["[1,"], "JSON document"),
    ],
)
def test_unreadable_bytes_elements(column, values, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        contract.assembler_for(Schema([column])).assemble([tensor("x", "BYTES", values)], {})


def test_unnamed_columns_go_in_schema_order_and_must_all_be_there():
    schema = Schema([ColSpec(DataType.long), ColSpec(DataType.string)])
    assembler = contract.assembler_for(schema)
    frame = assembler.assemble(
        [tensor("input-1", "BYTES", ["x"]), tensor("input-0", "INT64", [1])], {}
    )
    assert list(frame.columns) == ["input-0", "input-1"]
    with pytest.raises(ProtocolError, match="missing inputs"):
        assembler.assemble([tensor("input-1", "BYTES", ["x"])], {})


def test_columns_of_different_lengths():
    schema = Schema([ColSpec(DataType.long, "a"), ColSpec(DataType.long, "b")])
    with pytest.raises(ProtocolError, match="one table"):
        contract.assembler_for(schema).assemble(
            [tensor("a", "INT64", [1, 2]), tensor("b", "INT64", [1])], {}
        )


def test_tensor_inputs():
    named = Schema(
        [TensorSpec(np.dtype("float32"), (-1, 2), "x"), TensorSpec(np.dtype("int64"), (-1,), "y")]
    )
    given = [tensor("x", "FP32", np.ones((1, 2), np.float32)), tensor("y", "INT64", [3])]
    assert set(contract.assembler_for(named).assemble(given, {})) == {"x", "y"}
    single = contract.assembler_for(Schema([TensorSpec(np.dtype("float32"), (-1, 2))]))
    assert single.assemble(given[:1], {}).shape == (1, 2)
    with pytest.raises(ProtocolError, match="one tensor"):
        single.assemble(given, {})


def test_schemaless_content_types():
    assembler = contract.assembler_for(None)
    given = [tensor("m", "FP64", [[1.0, 2.0]]), tensor("t", "BYTES", [b"\xff"])]
    assert list(assembler.assemble(given[:1], {}).columns) == ["m"]  # pd: a column of rows
    assert assembler.assemble(given[:1], {"content_type": "np"}).shape == (1, 2)
    assert assembler.assemble(given, {"content_type": "dict"})["t"].tolist() == [b"\xff"]
    with pytest.raises(ProtocolError, match="one input"):
        assembler.assemble(given, {"content_type": "np"})
    with pytest.raises(ProtocolError, match="content_type"):
        assembler.assemble(given, {"content_type": "tensor"})


def summary(outputs):
    return [(o.name, o.datatype, list(o.array.shape)) for o in outputs]


def test_outputs_of_frames_series_dicts_and_arrays():
    frame = pd.DataFrame({"label": ["a", "b"], 1: [1.0, 2.0]})
    assert summary(contract.outputs_of(frame, [])) == [
        ("label", "BYTES", [2]),
        ("output-1", "FP64", [2]),
    ]
    assert summary(contract.outputs_of(pd.Series([1, 2]), ["score"])) == [("score", "INT64", [2])]
    assert summary(contract.outputs_of(pd.Series([1], name="p"), ["score"])) == [
        ("p", "INT64", [1])
    ]
    assert summary(contract.outputs_of({"a": [1, 2], "b": np.zeros((2, 3))}, [])) == [
        ("a", "INT64", [2]),
        ("b", "FP64", [2, 3]),
    ]
    assert summary(contract.outputs_of(np.zeros(4, np.uint8), [])) == [("output-0", "UINT8", [4])]
    assert summary(contract.outputs_of(["x", "y"], ["text"])) == [("text", "BYTES", [2])]
    assert summary(contract.outputs_of(7.5, [])) == [("output-0", "FP64", [])]


def test_outputs_of_awkward_values():
    ragged = contract.outputs_of([[1, 2], [3]], [])[0]
    assert (ragged.datatype, ragged.array.shape) == ("BYTES", (2,))
    records = contract.outputs_of([{"a": 1}, {"a": 2}], [])[0]
    assert records.datatype == "BYTES"
    dates = contract.outputs_of(pd.Series(pd.to_datetime(["2024-01-02"])), [])[0]
    assert dates.datatype == "BYTES" and dates.array[0].startswith("2024-01-02")
    nullable = contract.outputs_of(pd.Series([1, 2], dtype="Int64"), [])[0]
    assert nullable.datatype == "INT64"
    # pandas 2 gives float64 with NaN here; either way the missing value stays missing.
    first, second = contract.outputs_of(pd.Series([1, None], dtype="Int64"), [])[0].array
    assert first == 1 and pd.isna(second)
