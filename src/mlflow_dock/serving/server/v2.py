"""The Open Inference Protocol's REST API for the one model an image serves.

    GET  /v2                                          server metadata
    GET  /v2/health/live, /v2/health/ready            {"live": true}, {"ready": true}
    GET  /v2/models/<name>[/versions/<v>]             model metadata (from the MLflow signature)
    GET  /v2/models/<name>[/versions/<v>]/ready       {"name": ..., "ready": true}
    POST /v2/models/<name>[/versions/<v>]/infer       inference

The model is loaded before the server starts, so a server that answers is ready. Errors answer
`{"error": "..."}`: 400 for a request the model cannot take, 404 for another model or version
or path, 405 for a wrong method, 504 past MLflow's request timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mlflow.exceptions import MlflowException
from starlette.requests import Request
from starlette.responses import Response

from . import contract
from .errors import ProtocolError, not_found
from .tensors import HEADER_LENGTH, encode_response, parse_header_length, parse_request

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SERVER_NAME = "mlflow-dock"
# Bumped when what this server answers changes; reported by GET /v2.
SERVER_VERSION = "1"
EXTENSIONS = ("binary_tensor_data",)

_logger = logging.getLogger(__name__)

# Six routes: one pattern for the per-model ones lets every miss (another model, another
# version, an unknown path) answer in the protocol's error body, which a generic router's
# plain-text 404/405 would not.
_MODEL_ROUTE = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?"
)
_JSON = "application/json"


class V2Server:
    """ASGI app answering /v2 for one loaded MLflow pyfunc model."""

    def __init__(
        self, model: Any, *, name: str, version: str | None, request_timeout: float
    ) -> None:
        self._model = model
        self._name = name
        self._version = version
        self._timeout = request_timeout
        metadata = model.metadata
        input_schema = metadata.get_input_schema()
        output_schema = metadata.get_output_schema()
        params_schema = metadata.get_params_schema()
        self._inputs = contract.assembler_for(input_schema)
        self._output_names = [m.name for m in contract.describe(output_schema, "output-")]
        params = params_schema.params if params_schema is not None else ()
        self._param_names = frozenset(p.name for p in params)
        self._takes_params = "params" in inspect.signature(model.predict).parameters
        self._server_metadata = _json(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}
        )
        self._model_metadata = _json(self._describe(input_schema, output_schema))

    def _describe(self, input_schema: Any, output_schema: Any) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self._name}
        if self._version is not None:
            described["versions"] = [self._version]
        described["platform"] = "mlflow"
        described["inputs"] = [m.as_json() for m in contract.describe(input_schema, "input-")]
        described["outputs"] = [m.as_json() for m in contract.describe(output_schema, "output-")]
        unknown = {}
        if input_schema is None:
            unknown["inputs"] = (
                "unknown: the model has no MLflow input schema; any named tensors are accepted "
                "and passed as a pandas DataFrame, one column each (request parameter "
                "content_type: 'pd' (default), 'np' for one numpy array, 'dict' for a dict "
                "of arrays)"
            )
        if output_schema is None:
            unknown["outputs"] = (
                "unknown: the model has no MLflow output schema; outputs are named after "
                "what predict() returns"
            )
        if unknown:
            described["parameters"] = unknown
        return described

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._route(scope, Request(scope, receive))
        except ProtocolError as exc:
            response = error(exc.status, exc.message)
        except Exception as exc:
            _logger.exception("V2 request failed")
            response = error(500, f"internal error: {type(exc).__name__}: {exc}")
        await response(scope, receive, send)

    async def _route(self, scope: Scope, request: Request) -> Response:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/v2":
            _allow(method, "GET")
            return _ok(self._server_metadata)
        if path == "/v2/health/live":
            _allow(method, "GET")
            return _ok(b'{"live":true}')
        if path == "/v2/health/ready":
            _allow(method, "GET")
            return _ok(b'{"ready":true}')
        match = _MODEL_ROUTE.fullmatch(path)
        if match is None:
            raise not_found(f"no such endpoint: {path}")
        self._check_model(match["name"], match["version"])
        action = match["action"]
        if action is None:
            _allow(method, "GET")
            return _ok(self._model_metadata)
        if action == "/ready":
            _allow(method, "GET")
            return _ok(_json({"name": self._name, "ready": True}))
        _allow(method, "POST")
        return await self._infer(request)

    def _check_model(self, name: str, version: str | None) -> None:
        if name != self._name:
            raise not_found(f"unknown model {name!r}; this server serves {self._name!r}")
        if version is not None and version != self._version:
            served = f"version {self._version!r}" if self._version else "no versions"
            raise not_found(f"unknown version {version!r} of model {name!r}; it has {served}")

    async def _infer(self, request: Request) -> Response:
        body = await request.body()
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
        # Decoding, predict() and encoding run off the event loop, as MLflow's /invocations
        # does, so health checks answer while a long prediction runs.
        try:
            content, json_length = await asyncio.wait_for(
                asyncio.to_thread(self.infer, body, header_length), timeout=self._timeout
            )
        # Python 3.10 images: asyncio.TimeoutError is not yet the builtin there.
        except asyncio.TimeoutError:  # noqa: UP041
            return error(504, f"inference took longer than {self._timeout:g}s")
        if json_length is None:
            return Response(content, media_type=_JSON)
        return Response(
            content,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(json_length)},
        )

    def infer(self, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
        """One inference, synchronously: the response body and its JSON header's length."""
        request = parse_request(body, header_length)
        data = self._inputs.assemble(request.inputs, request.parameters)
        params = {k: v for k, v in request.parameters.items() if k in self._param_names}
        predictions = self._predict(data, params or None)
        outputs = contract.outputs_of(predictions, self._output_names)
        if request.outputs is None:
            chosen = [(tensor, request.binary_outputs) for tensor in outputs]
        else:
            by_name = {tensor.name: tensor for tensor in outputs}
            chosen = []
            for wanted in request.outputs:
                if wanted.name not in by_name:
                    raise ProtocolError(
                        f"unknown output {wanted.name!r}; the model returned {list(by_name)}"
                    )
                binary = request.binary_outputs if wanted.binary is None else wanted.binary
                chosen.append((by_name[wanted.name], binary))
        header: dict[str, Any] = {"model_name": self._name}
        if self._version is not None:
            header["model_version"] = self._version
        if request.id is not None:
            header["id"] = request.id
        return encode_response(header, chosen)

    def _predict(self, data: Any, params: dict[str, Any] | None) -> Any:
        try:
            if self._takes_params:
                return self._model.predict(data, params=params)
            return self._model.predict(data)
        except MlflowException as exc:
            # Schema enforcement and input errors: MLflow says which status they are.
            status: int = exc.get_http_status_code()  # type: ignore[no-untyped-call]
            raise ProtocolError(exc.message, status=status) from None
        except Exception as exc:
            # As MLflow's /invocations: an error inside the model is most often its input's.
            _logger.warning("predict() failed", exc_info=True)
            raise ProtocolError(
                "Encountered an unexpected error while evaluating the model. Verify that the "
                f"inputs are compatible with the model: {type(exc).__name__}: {exc}"
            ) from None


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise ProtocolError(f"{method} is not allowed here; use {allowed}", status=405)


def _json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _ok(content: bytes) -> Response:
    return Response(content, media_type=_JSON)


def error(status: int, message: str) -> Response:
    return Response(_json({"error": message}), status_code=status, media_type=_JSON)
