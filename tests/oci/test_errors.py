"""Tests for mlflow_dock.oci.errors: how registry failures are worded (the mapping of every
status and transport error is exercised through the client in test_remote.py)."""

from __future__ import annotations

import httpx

from mlflow_dock.errors import is_retryable
from mlflow_dock.oci.errors import Op, RegistryErrors, error_entries, ref_text


class Secrets:
    def __init__(self, *values: str) -> None:
        self.values = list(values)

    def secrets(self) -> list[str]:
        return self.values


def test_ref_text_names_tags_and_digests_as_docker_does() -> None:
    assert ref_text("team/x", "v1") == "team/x:v1"
    assert ref_text("team/x", "sha256:" + "a" * 64) == "team/x@sha256:" + "a" * 64


def test_error_entries_read_oci_bodies_and_token_servers() -> None:
    oci = httpx.Response(400, json={"errors": [{"code": "DENIED", "message": "no"}, "junk"]})
    assert error_entries(oci) == [("DENIED", "no")]
    assert error_entries(httpx.Response(401, json={"details": "bad password"})) == [
        ("", "bad password")
    ]
    assert error_entries(httpx.Response(502, text="<html>")) == []


def test_messages_are_one_line_with_every_secret_blanked() -> None:
    secrets = Secrets("pw-1")
    errors = RegistryErrors("registry.example.com", secrets)
    secrets.values.append("tok-2")  # learnt later: read at the time of the failure
    response = httpx.Response(503, json={"errors": [{"code": "X", "message": "pw-1\ntok-2"}]})
    error = errors.error(Op("getting manifest a:b", "a", "b"), response=response)
    assert str(error) == (
        "registry registry.example.com answered HTTP 503 while getting manifest a:b: "
        "X: <redacted> <redacted>"
    )
    assert is_retryable(error) and error.status_code == 503 and error.code == "X"


def test_a_token_servers_failure_says_so() -> None:
    errors = RegistryErrors("registry.example.com", Secrets())
    op = Op("checking /v2/", kind="token")
    error = errors.error(op, response=httpx.Response(400, json={"error": "invalid_scope"}))
    assert str(error) == (
        "token server of registry registry.example.com answered HTTP 400 while checking /v2/: "
        "invalid_scope"
    )
    assert not is_retryable(error)
