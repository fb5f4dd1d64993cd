"""The Open Inference Protocol's tensors on the wire: JSON, and the binary tensor data extension.

Requests are decoded once (the standard library's `json`: orjson is not in every model's
virtualenv) straight into numpy arrays; responses are encoded from numpy arrays with
`tolist()` (C speed) into one `json.dumps`, or appended raw after the JSON header when the
client asked for binary data (Triton's and KServe's clients ask by default).

Binary tensor data (Triton's "binary_tensor_data" extension, also KServe's): the JSON header's
length is in the `Inference-Header-Content-Length` header; each tensor whose `parameters` hold
`binary_data_size` takes that many bytes after it, in order: little-endian, row-major, BOOL one
byte per element, BYTES each element as a 4-byte little-endian length then its bytes.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ProtocolError

# Little-endian numpy types of the protocol's fixed-size datatypes.
NUMPY_TYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = frozenset(NUMPY_TYPES) | {"BYTES"}
HEADER_LENGTH = "inference-header-content-length"

_LENGTH = struct.Struct("<I")
_SIZES = {"i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}
_PREFIXES = {"i": "INT", "u": "UINT", "f": "FP"}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol's datatype for a numpy type; anything not numeric or boolean is BYTES."""
    kind = dtype.kind
    if kind == "b":
        return "BOOL"
    if kind in _SIZES and dtype.itemsize in _SIZES[kind]:
        return f"{_PREFIXES[kind]}{dtype.itemsize * 8}"
    return "BYTES"


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    array: np.ndarray[Any, Any]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: as the request-level binary_data_output says


@dataclass(frozen=True)
class InferenceRequest:
    id: str | None
    parameters: Mapping[str, Any]
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None
    binary_outputs: bool


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray[Any, Any]


def parse_header_length(raw: str | None, body_length: int) -> int | None:
    if raw is None:
        return None
    try:
        length = int(raw)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length {raw!r} is not a number") from None
    if not 0 <= length <= body_length:
        raise ProtocolError(
            f"Inference-Header-Content-Length {length} does not fit a body of {body_length} bytes"
        )
    return length


def parse_request(body: bytes, header_length: int | None) -> InferenceRequest:
    """Decode an inference request: the JSON object, then any binary tensor data after it."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        header, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        payload = json.loads(header)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ProtocolError(f"the request body is not a JSON object: {exc}") from None
    if not isinstance(payload, dict):
        raise ProtocolError("the request body must be a JSON object")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    parameters = _parameters(payload.get("parameters"), "the request")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    offset = 0
    inputs = []
    for raw in raw_inputs:
        tensor, offset = _input(raw, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise ProtocolError(
            f"{len(binary) - offset} bytes of binary data follow the JSON that no input claims"
        )
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"input names repeat: {names}")
    return InferenceRequest(
        id=request_id,
        parameters=parameters,
        inputs=tuple(inputs),
        outputs=_requested_outputs(payload.get("outputs")),
        binary_outputs=parameters.get("binary_data_output") is True,
    )


def _parameters(raw: object, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError(f"'parameters' of {where} must be a JSON object")
    return raw


def _input(raw: object, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(raw, dict):
        raise ProtocolError("every input must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError("every input needs a 'name' string")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(
            f"input {name!r}: datatype {datatype!r} is not one of {sorted(DATATYPES)}"
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        type(d) is int and d >= 0
        for d in shape  # bool is an int subclass: not a dimension
    ):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    count = math.prod(shape)
    size = _parameters(raw.get("parameters"), f"input {name!r}").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise ProtocolError(
                f"input {name!r}: binary_data_size {size!r} does not fit the binary data sent"
            )
        array = _from_binary(name, datatype, binary[offset : offset + size], count)
        offset += size
    elif "data" in raw:
        array = _from_json(name, datatype, raw["data"], count)
    else:
        raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
    return InputTensor(name, datatype, array.reshape(shape)), offset


def _from_json(name: str, datatype: str, data: object, count: int) -> np.ndarray[Any, Any]:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: 'data' must be a JSON array")
    try:
        # Nested (row-major) and flat data both work: the size is checked, then reshaped.
        array = np.array(data, dtype=object if datatype == "BYTES" else NUMPY_TYPES[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: data are not all {datatype}: {exc}") from None
    if datatype == "BYTES" and any(isinstance(item, (list, dict)) for item in array.flat):
        # numpy keeps ragged nesting as list elements rather than failing, as it does for numbers.
        raise ProtocolError(f"input {name!r}: nested data must be rectangular, of strings")
    if array.size != count:
        raise ProtocolError(
            f"input {name!r}: {array.size} elements do not fill the shape's {count}"
        )
    return array.reshape(-1)


def _from_binary(name: str, datatype: str, data: memoryview, count: int) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return _bytes_elements(name, data, count)
    dtype = NUMPY_TYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: {len(data)} bytes of {datatype} do not fill the shape's {count}"
        )
    # astype copies out of the request body (frombuffer is read-only) into native order.
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


def _bytes_elements(name: str, data: memoryview, count: int) -> np.ndarray[Any, Any]:
    elements = np.empty(count, dtype=object)
    position = 0
    end = len(data)
    for index in range(count):
        if position + 4 > end:
            raise ProtocolError(f"input {name!r}: BYTES data end before element {index}")
        (length,) = _LENGTH.unpack_from(data, position)
        position += 4
        if position + length > end:
            raise ProtocolError(f"input {name!r}: BYTES element {index} runs past the data")
        elements[index] = bytes(data[position : position + length])
        position += length
    if position != end:
        raise ProtocolError(f"input {name!r}: BYTES data hold more than the shape's {count}")
    return elements


def _requested_outputs(raw: object) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ProtocolError("'outputs' must be a list")
    requested = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("every requested output needs a 'name' string")
        parameters = _parameters(item.get("parameters"), f"output {item['name']!r}")
        binary = parameters.get("binary_data")
        binary = binary if isinstance(binary, bool) else None
        requested.append(RequestedOutput(item["name"], binary))
    return tuple(requested)


# --------------------------------------------------------------------------- responses


def encode_response(
    header: dict[str, Any], outputs: Sequence[tuple[OutputTensor, bool]]
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    tensors = []
    blobs: list[Any] = []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.array.shape),
        }
        if binary:
            blob = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(tensor)
        tensors.append(entry)
    header["outputs"] = tensors
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def _json_data(tensor: OutputTensor) -> list[Any]:
    items: list[Any] = tensor.array.ravel().tolist()
    if tensor.datatype != "BYTES" or tensor.array.dtype.kind == "U":
        return items
    return [_text(item) for item in items]


def _binary(tensor: OutputTensor) -> bytes | memoryview:
    if tensor.datatype == "BYTES":
        return b"".join(
            _LENGTH.pack(len(element)) + element
            for element in map(_element_bytes, tensor.array.ravel().tolist())
        )
    little = tensor.array.astype(NUMPY_TYPES[tensor.datatype], copy=False)
    # A view of the array's own memory: b"".join copies it once, into the response body.
    contiguous: Any = np.ascontiguousarray(little)
    return memoryview(contiguous).cast("B")


def _text(item: Any) -> Any:
    """A BYTES element as JSON: text stays text, missing values null, the rest as text."""
    if item is None or isinstance(item, str):
        return item
    if isinstance(item, float) and math.isnan(item):
        return None
    if isinstance(item, bytes):
        # As MLflow's own JSON does for binary values: JSON strings cannot carry raw bytes.
        return base64.b64encode(item).decode("ascii")
    if isinstance(item, np.ndarray):
        item = item.tolist()
    if isinstance(item, (dict, list, tuple)):
        return json.dumps(item, default=str)
    if hasattr(item, "isoformat"):
        return item.isoformat()
    return str(item)


def _element_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    text = _text(item)
    return b"" if text is None else str(text).encode()
