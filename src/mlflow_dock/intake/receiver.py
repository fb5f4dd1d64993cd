"""`POST /webhook` as a plain ASGI endpoint, answered before FastAPI's routing sees it.

At full intake rate the framework's per-request work (exception and exit-stack middleware,
route matching, dependency solving, a `Request` object, response classes) cost as much CPU as
verifying, parsing and storing the delivery together; on one process under one GIL that halved
the rate. This receiver does only what a delivery needs: read the body (1 MiB cap), hand it with
the three MLflow headers to the service, answer JSON. Every other request goes to the app.
The FastAPI route of the same path stays declared for the OpenAPI schema and serves the same
handler (`handle`) should anything reach it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mlflow_dock.errors import PayloadTooLargeError, RequestError
from mlflow_dock.intake.accept import Accepted
from mlflow_dock.intake.signatures import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from mlflow_dock.observe.context import log_context

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
AcceptAsync = Callable[[bytes, Mapping[str, str]], Awaitable[Accepted]]

# Header names as ASGI servers hand them over (lower-case bytes) -> the names `verify` reads.
_WANTED = {
    DELIVERY_ID_HEADER.encode("latin-1"): DELIVERY_ID_HEADER,
    TIMESTAMP_HEADER.encode("latin-1"): TIMESTAMP_HEADER,
    SIGNATURE_HEADER.encode("latin-1"): SIGNATURE_HEADER,
}
_JSON_HEADERS = (b"content-type", b"application/json")


class ClientDisconnected(Exception):
    """The client went away before its body was complete: nothing to answer."""


def accepted_body(accepted: Accepted) -> dict[str, object]:
    """The 202 answer (the `Accepted` schema of the OpenAPI document)."""
    job = accepted.job
    return {
        "job_id": job.id,
        "state": job.state.value,
        "duplicate": accepted.duplicate,
        "status_url": f"/builds/{job.id}",
    }


async def handle(
    accept: AcceptAsync,
    body: bytes,
    headers: Mapping[str, str],
    *,
    status_for: Callable[[RequestError], int],
    count: Callable[[str], None],
) -> tuple[int, dict[str, object]]:
    """One delivery -> (status, JSON body). Unexpected exceptions propagate (a 500)."""
    try:
        accepted = await accept(body, headers)
    except RequestError as exc:
        status = status_for(exc)
        count(str(status))
        # Rejects are rare and each says something an operator must act on (a wrong secret,
        # a clock off, an event MLflow sends that we do not know); accepted ones are counted.
        delivery_id = headers.get(DELIVERY_ID_HEADER, "")[:200]
        with log_context(delivery_id=delivery_id if delivery_id.isprintable() else None):
            logger.warning("webhook delivery rejected with %d: %s", status, exc)
        return status, {"detail": str(exc)}
    except Exception:
        count("500")
        raise
    count("duplicate" if accepted.duplicate else "202")
    return 202, accepted_body(accepted)


class WebhookReceiver:
    """ASGI middleware: `POST <path>` is answered here, everything else passes to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        path: str,
        accept: Callable[[], AcceptAsync],
        status_for: Callable[[RequestError], int],
        count: Callable[[str], None],
    ) -> None:
        self._app = app
        self._path = path
        self._accept = accept
        self._status_for = status_for
        self._count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self._is_path(scope):
            await self._app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        declared = -1
        for name, value in scope["headers"]:
            wanted = _WANTED.get(name)
            if wanted is not None:
                headers[wanted] = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        try:
            if declared > MAX_BODY_BYTES:
                raise PayloadTooLargeError(f"body exceeds {MAX_BODY_BYTES} bytes")
            body = await _read_body(receive)
        except ClientDisconnected:
            return
        except PayloadTooLargeError as exc:
            status = self._status_for(exc)
            self._count(str(status))
            await _answer(send, status, {"detail": str(exc)})
            return
        status, answer = await handle(
            self._accept(), body, headers, status_for=self._status_for, count=self._count
        )
        await _answer(send, status, answer)

    def _is_path(self, scope: Scope) -> bool:
        path: str = scope["path"]
        # Behind a proxy prefix (`--root-path`), ASGI paths start with the root path.
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return path == self._path


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLargeError(f"body exceeds {MAX_BODY_BYTES} bytes")
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLargeError(f"body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Send, status: int, payload: dict[str, object]) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON_HEADERS, (b"content-length", str(len(body)).encode("latin-1"))],
        }
    )
    await send({"type": "http.response.body", "body": body})
