"""`WebhookReceiver`: the plain ASGI `POST /webhook` in front of the FastAPI app."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

import pytest

from mlflow_dock.errors import RequestError, SignatureError, UnavailableError
from mlflow_dock.intake.accept import Accepted
from mlflow_dock.intake.api import status_for
from mlflow_dock.intake.receiver import MAX_BODY_BYTES, WebhookReceiver
from mlflow_dock.jobs.model import Job, JobKind, JobState

JOB = Job(id="j-1", kind=JobKind.BUILD, model_name="m", version="1", state=JobState.QUEUED)


class Fake:
    """The service's `accept_async` and the metrics counter, recording what they saw."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.seen: list[tuple[bytes, dict[str, str]]] = []
        self.counted: list[str] = []
        self.passed: list[str] = []

    async def accept(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        self.seen.append((body, dict(headers)))
        if self.error is not None:
            raise self.error
        return Accepted(JOB, duplicate=False)

    async def app(self, scope, receive, send) -> None:
        self.passed.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def receiver(self) -> WebhookReceiver:
        return WebhookReceiver(
            self.app,
            path="/webhook",
            accept=lambda: self.accept,
            status_for=status_for,
            count=self.counted.append,
        )


def call(receiver, messages, *, method="POST", path="/webhook", headers=()):
    """Run one request through the receiver; returns (status, JSON body or None)."""
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    inbox = list(messages)
    sent: list[dict] = []

    async def receive():
        return inbox.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(receiver(scope, receive, send))
    if not sent:
        return None, None
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], (json.loads(body) if body else None)


MLFLOW_HEADERS = (
    (b"x-mlflow-delivery-id", b"d-1"),
    (b"x-mlflow-timestamp", b"1700000000"),
    (b"x-mlflow-signature", b"v1,abc"),
    (b"content-type", b"application/json"),
)


def test_a_delivery_gets_its_job_and_the_service_sees_body_and_mlflow_headers():
    fake = Fake()
    status, answer = call(
        fake.receiver(),
        [
            {"type": "http.request", "body": b'{"a":', "more_body": True},
            {"type": "http.request", "body": b"1}"},
        ],
        headers=MLFLOW_HEADERS,
    )
    assert status == 202
    assert answer == {
        "job_id": "j-1",
        "state": "queued",
        "duplicate": False,
        "status_url": "/builds/j-1",
    }
    body, headers = fake.seen[0]
    assert body == b'{"a":1}'
    assert headers == {
        "x-mlflow-delivery-id": "d-1",
        "x-mlflow-timestamp": "1700000000",
        "x-mlflow-signature": "v1,abc",
    }
    assert fake.counted == ["202"]


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/webhook"), ("POST", "/builds"), ("POST", "/webhook/")]
)
def test_everything_else_goes_to_the_app(method, path):
    fake = Fake()
    status, _ = call(fake.receiver(), [], method=method, path=path)
    assert status == 204 and fake.passed == [path] and not fake.seen


def test_behind_a_root_path_the_webhook_is_still_answered_here():
    fake = Fake()
    receiver = fake.receiver()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/dock/webhook",
        "root_path": "/dock",
        "headers": list(MLFLOW_HEADERS),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}"}

    async def send(message):
        sent.append(message)

    asyncio.run(receiver(scope, receive, send))
    assert sent[0]["status"] == 202 and fake.seen and not fake.passed


def test_a_body_over_one_mib_in_chunks_is_413_without_asking_the_service():
    fake = Fake()
    chunk = b" " * (MAX_BODY_BYTES // 2)
    status, answer = call(
        fake.receiver(),
        [{"type": "http.request", "body": chunk, "more_body": True}] * 3,
        headers=MLFLOW_HEADERS,
    )
    assert status == 413 and "exceeds" in answer["detail"]
    assert not fake.seen and fake.counted == ["413"]


def test_a_declared_length_over_one_mib_is_413_before_reading():
    fake = Fake()
    status, _ = call(
        fake.receiver(), [], headers=(*MLFLOW_HEADERS, (b"content-length", b"2000000"))
    )
    assert status == 413 and not fake.seen


def test_a_client_gone_mid_body_gets_no_answer_and_stores_nothing():
    fake = Fake()
    status, _ = call(
        fake.receiver(),
        [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}],
        headers=MLFLOW_HEADERS,
    )
    assert status is None and not fake.seen and not fake.counted


@pytest.mark.parametrize(
    ("error", "status"),
    [(SignatureError("invalid webhook signature"), 401), (UnavailableError("retry later"), 503)],
)
def test_rejects_are_answered_counted_and_logged_with_their_reason(caplog, error, status):
    fake = Fake(error)
    with caplog.at_level(logging.WARNING, logger="mlflow_dock.intake.receiver"):
        got, answer = call(fake.receiver(), [{"type": "http.request"}], headers=MLFLOW_HEADERS)
    assert got == status and answer == {"detail": str(error)}
    assert fake.counted == [str(status)]
    assert [r.getMessage() for r in caplog.records] == [
        f"webhook delivery rejected with {status}: {error}"
    ]


def test_an_unexpected_error_propagates_to_the_server_error_handler():
    fake = Fake(KeyError("bug"))
    with pytest.raises(KeyError):
        call(fake.receiver(), [{"type": "http.request"}], headers=MLFLOW_HEADERS)
    assert fake.counted == ["500"]


def test_every_request_error_maps_to_a_status():
    assert status_for(RequestError("x")) == 400
