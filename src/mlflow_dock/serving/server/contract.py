"""What a model's MLflow signature means for V2: tensor metadata, and tensors in, predictions out.

The mapping (documented for clients; MLServer's MLflow runtime made similar choices):

* Column-based signature: one input tensor per column, named after it (`input-<i>` when the
  column has no name), shape `[-1]` (one element per row; `[N, 1]` is accepted too), datatype
  from the column type: boolean BOOL, integer INT32, long INT64, float FP32, double FP64,
  string/datetime BYTES (text), binary BYTES (raw bytes; base64 text in JSON, as MLflow's own
  JSON), array/object/map/any BYTES holding one JSON document per row. The tensors become one
  pandas DataFrame, one column each.
* Tensor-based signature: one input per TensorSpec with its datatype and shape (-1 where MLflow
  has -1); named specs are passed as a dict of arrays, a single unnamed one as the array itself
  (its V2 name is `input-0`, and any one input name is accepted for it).
* No input schema: metadata lists no inputs and says so in `parameters`; any named tensors are
  accepted and become a DataFrame (request parameter `content_type`: `pd`, the default; `np`
  passes a single tensor as a numpy array; `dict` a dict of arrays). Nothing is guessed.
* Outputs: a DataFrame gives one output per column (named after it), a dict one per key, a
  Series, array, list or scalar one output named after the signature's (first) output, or
  `output-0`. Datatypes come from the values returned, not the signature.
* Request `parameters` whose names are in the model's ParamSchema are passed as `params`; the
  rest are protocol or transport settings and never reach the model.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from mlflow.types.schema import ColSpec, DataType, Schema, TensorSpec

from .errors import ProtocolError
from .tensors import InputTensor, OutputTensor, datatype_of

# How BYTES elements are handed to the model.
TEXT = "text"  # str; binary-extension bytes decoded as UTF-8
RAW = "raw"  # bytes; JSON strings base64-decoded
JSON_DOCUMENT = "json"  # each element parsed as a JSON document
AS_SENT = "as-sent"  # no signature: text stays text, bytes become text where they are UTF-8

_COLUMN_TYPES: Mapping[str, tuple[str, str]] = {
    "boolean": ("BOOL", TEXT),
    "integer": ("INT32", TEXT),
    "long": ("INT64", TEXT),
    "float": ("FP32", TEXT),
    "double": ("FP64", TEXT),
    "string": ("BYTES", TEXT),
    "binary": ("BYTES", RAW),
    "datetime": ("BYTES", TEXT),
}


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]
    elements: str = TEXT
    optional: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def describe(schema: Schema | None, prefix: str) -> tuple[TensorMetadata, ...]:
    if schema is None:
        return ()
    described = []
    for index, spec in enumerate(schema.inputs):
        name = spec.name or f"{prefix}{index}"
        if isinstance(spec, TensorSpec):
            dtype = np.dtype(spec.type)
            described.append(
                TensorMetadata(
                    name,
                    datatype_of(dtype),
                    tuple(int(d) for d in spec.shape),
                    RAW if dtype.kind == "S" else TEXT,
                )
            )
        else:
            datatype, elements = _column_type(spec)
            described.append(
                TensorMetadata(name, datatype, (-1,), elements, optional=not spec.required)
            )
    return tuple(described)


def _column_type(spec: ColSpec) -> tuple[str, str]:
    if isinstance(spec.type, DataType):
        return _COLUMN_TYPES.get(spec.type.name, ("BYTES", TEXT))
    return ("BYTES", JSON_DOCUMENT)  # Array, Object, Map, AnyType


# --------------------------------------------------------------------------- tensors in


class InputAssembler(Protocol):
    """Turns a request's tensors into what the model's predict() takes."""

    def assemble(self, inputs: Sequence[InputTensor], parameters: Mapping[str, Any]) -> Any: ...


def assembler_for(schema: Schema | None) -> InputAssembler:
    """Chosen once per model, from its input schema."""
    if schema is None:
        return SchemalessInputs()
    metadata = describe(schema, "input-")
    if not schema.is_tensor_spec():
        return ColumnInputs(metadata, named=schema.has_input_names())
    if schema.has_input_names():
        return TensorDictInputs(metadata)
    return SingleTensorInput(metadata[0])


@dataclass(frozen=True)
class ColumnInputs:
    metadata: tuple[TensorMetadata, ...]
    named: bool

    def assemble(self, inputs: Sequence[InputTensor], parameters: Mapping[str, Any]) -> Any:
        by_name = {m.name: m for m in self.metadata}
        _refuse_unknown(inputs, by_name)
        given = {t.name: t for t in inputs}
        if not self.named:
            # MLflow matches unnamed columns by position: send them in the schema's order.
            missing = [m.name for m in self.metadata if m.name not in given and not m.optional]
            if missing:
                raise ProtocolError(f"missing inputs: {missing}")
            inputs = [given[m.name] for m in self.metadata if m.name in given]
        return _frame(inputs, lambda name: by_name[name].elements)


@dataclass(frozen=True)
class TensorDictInputs:
    metadata: tuple[TensorMetadata, ...]

    def assemble(self, inputs: Sequence[InputTensor], parameters: Mapping[str, Any]) -> Any:
        by_name = {m.name: m for m in self.metadata}
        _refuse_unknown(inputs, by_name)
        return {t.name: _elements(t, by_name[t.name].elements) for t in inputs}


@dataclass(frozen=True)
class SingleTensorInput:
    metadata: TensorMetadata

    def assemble(self, inputs: Sequence[InputTensor], parameters: Mapping[str, Any]) -> Any:
        if len(inputs) != 1:
            raise ProtocolError(
                f"the model takes one tensor ({self.metadata.name!r}); got {len(inputs)}"
            )
        return _elements(inputs[0], self.metadata.elements)


class SchemalessInputs:
    """No input schema: the client's tensors, as the request's `content_type` says."""

    def assemble(self, inputs: Sequence[InputTensor], parameters: Mapping[str, Any]) -> Any:
        content_type = parameters.get("content_type", "pd")
        if content_type == "pd":
            return _frame(inputs, lambda name: AS_SENT)
        if content_type == "dict":
            return {t.name: _elements(t, AS_SENT) for t in inputs}
        if content_type == "np":
            if len(inputs) != 1:
                raise ProtocolError(f"content_type 'np' takes one input; got {len(inputs)}")
            return _elements(inputs[0], AS_SENT)
        raise ProtocolError(f"content_type {content_type!r} is not one of 'pd', 'np', 'dict'")


def _refuse_unknown(inputs: Sequence[InputTensor], known: Mapping[str, TensorMetadata]) -> None:
    unknown = [t.name for t in inputs if t.name not in known]
    if unknown:
        raise ProtocolError(f"unknown inputs {unknown}; the model's inputs are {list(known)}")


def _frame(inputs: Sequence[InputTensor], elements_of: Any) -> pd.DataFrame:
    columns = {t.name: _column(_elements(t, elements_of(t.name))) for t in inputs}
    try:
        return pd.DataFrame(columns)
    except ValueError as exc:  # columns of different lengths
        raise ProtocolError(f"inputs do not make one table: {exc}") from None


def _column(array: np.ndarray[Any, Any]) -> Any:
    if array.ndim == 1:
        return array
    if array.ndim == 0 or (array.ndim == 2 and array.shape[1] == 1):
        return array.reshape(-1)
    return list(array)  # one sub-array per row, for array-typed columns


def _elements(tensor: InputTensor, elements: str) -> np.ndarray[Any, Any]:
    array = tensor.array
    if tensor.datatype != "BYTES":
        return array
    flat = array.reshape(-1)
    if elements == TEXT:
        if all(type(item) is str for item in flat):
            return array
        converted = [_decode_text(tensor.name, item) for item in flat]
    elif elements == RAW:
        converted = [_decode_raw(tensor.name, item) for item in flat]
    elif elements == JSON_DOCUMENT:
        converted = [_decode_json(tensor.name, item) for item in flat]
    else:
        converted = [_decode_as_sent(item) for item in flat]
    result = np.empty(len(converted), dtype=object)
    result[:] = converted
    return result.reshape(array.shape)


def _decode_text(name: str, item: Any) -> Any:
    if isinstance(item, bytes):
        try:
            return item.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"input {name!r}: an element is not UTF-8 text") from None
    return item


def _decode_raw(name: str, item: Any) -> Any:
    if isinstance(item, str):
        try:
            return base64.b64decode(item, validate=True)
        except binascii.Error:
            raise ProtocolError(f"input {name!r}: binary elements in JSON are base64") from None
    return item


def _decode_json(name: str, item: Any) -> Any:
    if isinstance(item, (str, bytes)):
        try:
            return json.loads(item)
        except ValueError:
            raise ProtocolError(f"input {name!r}: an element is not a JSON document") from None
    return item


def _decode_as_sent(item: Any) -> Any:
    if isinstance(item, bytes):
        try:
            return item.decode()
        except UnicodeDecodeError:
            return item
    return item


# --------------------------------------------------------------------------- predictions out


def outputs_of(predictions: Any, names: Sequence[str]) -> list[OutputTensor]:
    """The named output tensors of what predict() returned; `names` from the output schema."""
    if isinstance(predictions, pd.DataFrame):
        return [
            _output(_label(label, index, names), _series_values(column))
            for index, (label, column) in enumerate(predictions.items())
        ]
    if isinstance(predictions, pd.Series):
        return [_output(_label(predictions.name, 0, names), _series_values(predictions))]
    if isinstance(predictions, dict):
        return [_output(str(key), _array(value)) for key, value in predictions.items()]
    return [_output(names[0] if names else "output-0", _array(predictions))]


def _label(label: Any, index: int, names: Sequence[str]) -> str:
    if isinstance(label, str):
        return label
    return names[index] if index < len(names) else f"output-{index}"


def _series_values(series: Any) -> np.ndarray[Any, Any]:
    values: np.ndarray[Any, Any] = series.to_numpy()
    if values.dtype == object:
        # Nullable extension types (Int64, boolean, Float64) without missing values keep
        # their number type instead of becoming BYTES.
        numpy_dtype = getattr(series.dtype, "numpy_dtype", None)
        if numpy_dtype is not None and numpy_dtype.kind in "biuf" and not series.isna().any():
            values = series.to_numpy(dtype=numpy_dtype)
        elif isinstance(series.dtype, pd.api.extensions.ExtensionDtype):
            values = series.to_numpy(dtype=object, na_value=None)  # pd.NA is JSON null
    return values


def _array(value: Any) -> np.ndarray[Any, Any]:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (pd.Series, pd.Index)):
        return _series_values(value)
    if isinstance(value, pd.DataFrame):
        frame_values: np.ndarray[Any, Any] = value.to_numpy()
        return frame_values
    try:
        return np.asarray(value)
    except ValueError:  # ragged nesting: one element per item
        items = list(value)
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array


def _output(name: str, array: np.ndarray[Any, Any]) -> OutputTensor:
    kind = array.dtype.kind
    if kind == "M":
        array = np.datetime_as_string(array)
    elif kind in "mcV":
        array = array.astype(str)
    return OutputTensor(name, datatype_of(array.dtype), array)
