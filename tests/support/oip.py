"""Drive an Open Inference Protocol (V2) server with Triton's and KServe's Python clients.

Plain functions (no pytest) taking a base URL and a model name, so the serving-layer tests (a
uvicorn child process) and the image integration tests (a container) check servers the same
way. Each first asks the server whether it is live and the model ready, as a client would,
then infers and returns the outputs by name as numpy arrays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass(frozen=True)
class V2Answer:
    outputs: dict[str, np.ndarray]
    request_id: str | None
    model_version: str | None
    metadata: dict[str, Any] | None  # the model metadata, where the client can ask for it


def datatype_of(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    datatype = np_to_triton_dtype(array.dtype)
    if datatype is None:
        raise ValueError(f"no V2 datatype for numpy {array.dtype}")
    return str(datatype)


def columns_as_tensors(frame: Any) -> dict[str, np.ndarray]:
    """A pandas DataFrame as V2 input tensors for a column-based model: one per column."""
    tensors = {}
    for name, column in frame.items():
        values = column.to_numpy()
        tensors[str(name)] = values.astype(object) if values.dtype.kind in "OUS" else values
    return tensors


def infer_with_tritonclient(
    base_url: str,
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str = "",
    binary: bool = True,
    outputs: Sequence[str] = (),
    request_id: str = "mlflow-dock-test",
    timeout: float = 60.0,
    parameters: Mapping[str, Any] | None = None,
) -> V2Answer:
    """Infer with `tritonclient.http` (binary tensor data unless `binary` is False);
    `parameters` are the request's (a model's params, by name)."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(
        url=urlsplit(base_url).netloc, connection_timeout=timeout, network_timeout=timeout
    )
    try:
        if not client.is_server_live():
            raise AssertionError(f"{base_url}: server not live")
        if not client.is_server_ready():
            raise AssertionError(f"{base_url}: server not ready")
        if not client.is_model_ready(model_name, version):
            raise AssertionError(f"{base_url}: model {model_name!r} {version!r} not ready")
        metadata = client.get_model_metadata(model_name, version)
        tensors = []
        for name, array in inputs.items():
            tensor = triton.InferInput(name, list(array.shape), datatype_of(array))
            tensor.set_data_from_numpy(array, binary_data=binary)
            tensors.append(tensor)
        requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
        result = client.infer(
            model_name,
            tensors,
            model_version=version,
            outputs=requested or None,
            request_id=request_id,
            parameters=dict(parameters) if parameters else None,
        )
        response = result.get_response()
        return V2Answer(
            outputs={o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]},
            request_id=response.get("id"),
            model_version=response.get("model_version"),
            metadata=metadata,
        )
    finally:
        client.close()


def infer_with_kserve(
    base_url: str,
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    *,
    binary: bool = True,
    request_id: str = "mlflow-dock-test",
    timeout: float = 60.0,
) -> V2Answer:
    """Infer with the KServe SDK's `InferenceRESTClient` (protocol v2)."""
    return asyncio.run(
        _infer_with_kserve(base_url, model_name, inputs, binary, request_id, timeout)
    )


async def _infer_with_kserve(
    base_url: str,
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    binary: bool,
    request_id: str,
    timeout: float,
) -> V2Answer:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=timeout, retries=0))
    try:
        if not await client.is_server_live(base_url):
            raise AssertionError(f"{base_url}: server not live")
        if not await client.is_server_ready(base_url):
            raise AssertionError(f"{base_url}: server not ready")
        if not await client.is_model_ready(base_url, model_name):
            raise AssertionError(f"{base_url}: model {model_name!r} not ready")
        tensors = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), datatype_of(array))
            tensor.set_data_from_numpy(array, binary_data=binary)
            tensors.append(tensor)
        request = InferRequest(model_name=model_name, infer_inputs=tensors, request_id=request_id)
        response = await client.infer(base_url, request, model_name=model_name)
        return V2Answer(
            outputs={o.name: o.as_numpy() for o in response.outputs},
            request_id=response.id,
            model_version=None,
            metadata=None,
        )
    finally:
        await client.close()
