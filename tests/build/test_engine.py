"""Which engine failures are retried: from statuses and what failed, never from message text."""

from __future__ import annotations

import docker.errors
import pytest
import requests

from mlflow_dock.build.engine import _stream_error, _translate_sdk_error, classify_engine_error
from mlflow_dock.errors import PermanentError, RetryableError


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        # The registry hung: the engine gave up on it. Nothing refused anything.
        ({"error": "context deadline exceeded", "errorDetail": {}}, RetryableError),
        (
            {"error": "received unexpected HTTP status: 503", "errorDetail": {"code": 503}},
            RetryableError,
        ),
        ({"error": "toomanyrequests", "errorDetail": {"code": 429}}, RetryableError),
        ({"error": "blob upload unknown", "errorDetail": {"code": 404}}, PermanentError),
        ({"error": "unauthorized: authentication required"}, PermanentError),
        ({"error": "denied: requested access to the resource is denied"}, PermanentError),
        ({"error": "write tcp: connection reset by peer"}, RetryableError),
    ],
)
def test_push_stream_errors(chunk, expected):
    assert isinstance(_stream_error(chunk, "pushing r/m:v1", transfer=True), expected)


@pytest.mark.parametrize(
    "message",
    [
        "The command '/bin/sh -c pip install x' returned a non-zero code: 1",
        # Text that once matched a "retryable" pattern does not make a build step retryable.
        "pip: Read timed out. (read timeout=15) ... connection reset; 503",
    ],
)
def test_failed_build_steps_are_permanent(message):
    chunk = {"error": message, "errorDetail": {"code": 1, "message": message}}
    assert isinstance(_stream_error(chunk, "building m:v1", transfer=False), PermanentError)


def test_engine_unreachable_is_retryable():
    error = _translate_sdk_error(requests.exceptions.ConnectionError("refused"), "building")
    assert isinstance(error, RetryableError)


def test_engine_api_statuses():
    assert isinstance(classify_engine_error("internal error", what="x", status=500), RetryableError)
    assert isinstance(classify_engine_error("no such image", what="x", status=404), PermanentError)


def test_engine_500_carrying_a_refusal_is_permanent():
    class Response:
        status_code = 500
        reason = "Server Error"
        url = "http://engine/images/create"

    exc = docker.errors.APIError(
        "pull failed", response=Response(), explanation="pull access denied for x"
    )
    assert isinstance(_translate_sdk_error(exc, "pulling x", transfer=True), PermanentError)
