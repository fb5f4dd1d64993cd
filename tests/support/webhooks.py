"""Helpers to play either side of an MLflow webhook delivery in tests and benchmarks.

``sign()``/``signed_request()`` reproduce exactly what MLflow 3.17's sender does
(mlflow/webhooks/delivery.py), so tests can drive the service without an MLflow server.
``WebhookRecorder`` is a throwaway receiver for checking what a real server sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    message = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def envelope(entity: str, action: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "entity": entity,
        "action": action,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": data,
    }


def model_version_created(
    name: str, version: str, source: str | None = None, run_id: str | None = None
) -> dict[str, Any]:
    return envelope(
        "model_version",
        "created",
        {
            "name": name,
            "version": str(version),
            "source": source or f"models:/m-{uuid.uuid4().hex}",
            "run_id": run_id,
            "tags": {},
            "description": None,
        },
    )


def model_version_alias_created(name: str, alias: str, version: str) -> dict[str, Any]:
    return envelope(
        "model_version_alias", "created", {"name": name, "alias": alias, "version": str(version)}
    )


def signed_request(
    payload: dict[str, Any],
    secret: str | None,
    *,
    delivery_id: str | None = None,
    timestamp: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body bytes and headers as MLflow would send them (json.dumps default separators)."""
    body = json.dumps(payload).encode("utf-8")
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/json",
        DELIVERY_ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: ts,
    }
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(secret, delivery_id, ts, body)
    return body, headers


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    received_at: float

    def json(self) -> Any:
        return json.loads(self.body)

    def signature_valid(self, secret: str) -> bool:
        expected = sign(
            secret,
            self.headers.get(DELIVERY_ID_HEADER.lower(), ""),
            self.headers.get(TIMESTAMP_HEADER.lower(), ""),
            self.body,
        )
        return hmac.compare_digest(expected, self.headers.get(SIGNATURE_HEADER.lower(), ""))


class WebhookRecorder:
    """HTTP receiver on 127.0.0.1 in a background thread that records every POST."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[RecordedRequest] = []
        self._cond = threading.Condition()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                req = RecordedRequest(
                    method="POST",
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    received_at=time.time(),
                )
                with recorder._cond:
                    recorder.requests.append(req)
                    recorder._cond.notify_all()
                self.send_response(recorder.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/webhook"

    def wait_for(
        self,
        predicate: Callable[[RecordedRequest], bool] = lambda _: True,
        timeout: float = 30.0,
    ) -> RecordedRequest:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for req in self.requests:
                    if predicate(req):
                        return req
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no matching webhook within {timeout:.0f}s; "
                        f"got {len(self.requests)} request(s)"
                    )
                self._cond.wait(remaining)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
