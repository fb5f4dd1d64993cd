"""Which engine failures are retried: from statuses and what failed, never from message text."""

from __future__ import annotations

import docker
import docker.errors
import pytest
import requests

from mlflow_dock.cloud.static import StaticCredentials
from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.imaging.engine import (
    DockerEngine,
    _stream_error,
    _translate_sdk_error,
    classify_engine_error,
    with_fresh_credentials,
)
from support.fakes import RotatingCredentials


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


class TokenCheckingApi:
    """The docker SDK's low-level pull/push as the engine answers them: a stream of JSON
    chunks, with the registry's refusal of an expired token inside it."""

    def __init__(self, valid_password: str) -> None:
        self.valid = valid_password
        self.calls: list[tuple[str, str]] = []

    def _stream(self, operation: str, auth_config: dict[str, str]):
        self.calls.append((operation, auth_config["password"]))
        if auth_config["password"] != self.valid:
            yield {
                "error": "unauthorized: authentication required",
                "errorDetail": {"message": "unauthorized: authentication required"},
            }
            return
        yield {"status": "Digest: sha256:" + "f" * 64}
        yield {"aux": {"Digest": "sha256:" + "f" * 64}}

    def pull(self, repository, *, tag, stream, decode, auth_config):
        return self._stream("pull", auth_config)

    def push(self, repository, *, tag, stream, decode, auth_config):
        return self._stream("push", auth_config)


def engine_with(api: TokenCheckingApi) -> DockerEngine:
    engine = DockerEngine()
    engine._client = type("Client", (), {"api": api})()
    return engine


def test_an_engine_pull_refused_for_an_expired_token_is_retried_with_a_fresh_one():
    credentials = RotatingCredentials()
    api = TokenCheckingApi(valid_password="token-1")  # token-0 expired early
    engine = engine_with(api)
    with_fresh_credentials(
        credentials,
        lambda c: engine.pull(
            "r/m", "sha256:" + "a" * 64, username=c.username, password=c.password
        ),
    )
    assert credentials.invalidated == 1
    assert api.calls == [("pull", "token-0"), ("pull", "token-1")]


def test_an_engine_push_refused_for_an_expired_token_is_retried_with_a_fresh_one():
    credentials = RotatingCredentials()
    api = TokenCheckingApi(valid_password="token-1")
    engine = engine_with(api)
    result = with_fresh_credentials(
        credentials,
        lambda c: engine.push("r/m", "1", username=c.username, password=c.password, log=print),
    )
    assert result.digest == "sha256:" + "f" * 64
    assert api.calls == [("push", "token-0"), ("push", "token-1")]


def test_a_refused_static_password_is_not_tried_twice():
    api = TokenCheckingApi(valid_password="right")
    engine = engine_with(api)
    with pytest.raises(PermanentError, match="unauthorized"):
        with_fresh_credentials(
            StaticCredentials(username="u", password="wrong"),
            lambda c: engine.pull("r/m", "1", username=c.username, password=c.password),
        )
    assert len(api.calls) == 1


def test_a_refresh_that_is_refused_again_fails_for_good():
    credentials = RotatingCredentials()
    api = TokenCheckingApi(valid_password="never")
    engine = engine_with(api)
    with pytest.raises(PermanentError):
        with_fresh_credentials(
            credentials,
            lambda c: engine.pull("r/m", "1", username=c.username, password=c.password),
        )
    assert credentials.invalidated == 1 and len(api.calls) == 2


def test_a_tls_daemon_is_reached_with_the_certificates_of_docker_cert_path(tmp_path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("not read until a connection is made")
    engine = DockerEngine(
        base_url="tcp://builder.example:2376", tls_verify="1", cert_path=str(tmp_path)
    )
    connection = engine.connection()
    # With an explicit API version the SDK's client makes no request on construction.
    assert docker.APIClient(version="1.41", **connection).base_url == (
        "https://builder.example:2376"
    )
    tls = connection["tls"]
    assert tls.verify is True and tls.ca_cert == str(tmp_path / "ca.pem")
    assert tls.cert == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))


def test_without_tls_settings_the_engine_url_is_used_as_given() -> None:
    connection = DockerEngine(base_url="tcp://builder.example:2375").connection()
    assert "tls" not in connection
    assert docker.APIClient(version="1.41", **connection).base_url == (
        "http://builder.example:2375"
    )
    assert DockerEngine().connection() == {}
