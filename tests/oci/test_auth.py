"""Tests for mlflow_dock.oci.auth: WWW-Authenticate parsing (the HTTP flows are in test_remote)."""

from __future__ import annotations

import pytest

from mlflow_dock.oci.auth import (
    Challenge,
    RegistryAuth,
    TokenRequest,
    parse_challenges,
    parse_token_response,
)


def test_parse_challenge_with_commas_inside_quotes() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:samalba/my-app:pull,push"'
    )
    assert parse_challenges([header]) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:samalba/my-app:pull,push",
            },
        )
    ]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (['Basic realm="Registry Realm"'], [("basic", {"realm": "Registry Realm"})]),
        # Several challenges in one header, odd spacing, case-insensitive names.
        (
            ['Basic realm="a, b" , BEARER Realm="https://x/t", Scope="repository:r:pull,push"'],
            [
                ("basic", {"realm": "a, b"}),
                ("bearer", {"realm": "https://x/t", "scope": "repository:r:pull,push"}),
            ],
        ),
        # Several headers.
        (
            ["Negotiate abc123==", 'Bearer realm="https://x/t"'],
            [("negotiate", {}), ("bearer", {"realm": "https://x/t"})],
        ),
        # Escaped quote and backslash inside a quoted string.
        (['Basic realm="say \\"hi\\", \\\\o/"'], [("basic", {"realm": 'say "hi", \\o/'})]),
        # Unquoted values, including a URL that is not a valid RFC 7235 token.
        (
            ["Bearer realm=https://auth.example.com/token,service=reg"],
            [("bearer", {"realm": "https://auth.example.com/token", "service": "reg"})],
        ),
        # Empty quoted value and a duplicate parameter (the first one wins).
        (['Bearer realm="",realm="second"'], [("bearer", {"realm": ""})]),
        ([""], []),
        (["   ,  "], []),
    ],
)
def test_parse_challenges(headers: list[str], expected: list[tuple[str, dict[str, str]]]) -> None:
    parsed = parse_challenges(headers)
    assert [(c.scheme, dict(c.params)) for c in parsed] == expected


def test_secrets_and_repr_never_show_the_password() -> None:
    auth = RegistryAuth(username="u", password="pw-123")
    assert "pw-123" not in repr(vars(auth))
    assert "pw-123" in auth.secrets()


def test_anonymous_sends_nothing_up_front() -> None:
    auth = RegistryAuth(username=None, password=None)
    assert auth.basic_header is None
    assert auth.cached("team/x", ("pull",)) is None


def test_a_bearer_challenge_names_the_token_to_fetch_and_the_token_is_then_cached() -> None:
    auth = RegistryAuth(username="u", password="pw")
    challenge = (
        'Bearer realm="https://auth.example.com/token",service="reg",scope="repository:a/b:pull"'
    )
    wanted = auth.respond([challenge], "a/b", ("pull", "push"), None)
    assert wanted == TokenRequest(
        "https://auth.example.com/token", "reg", "repository:a/b:pull,push"
    )
    assert auth.remember_token(wanted, "tok", 300) == "Bearer tok"
    # Known up front from now on, for the same scope only.
    assert auth.cached("a/b", ("pull", "push")) == "Bearer tok"
    assert auth.cached("a/b", ("pull",)) is None
    # The same token refused: another one must be fetched, not the refused one sent again.
    assert auth.respond([challenge], "a/b", ("pull", "push"), "Bearer tok") == wanted
    assert "tok" in auth.secrets()


def test_basic_is_retried_once_and_only_with_credentials() -> None:
    auth = RegistryAuth(username="u", password="pw")
    basic = auth.basic_header
    assert auth.respond(['Basic realm="r"'], "a/b", ("pull",), None) == basic
    assert auth.respond(['Basic realm="r"'], "a/b", ("pull",), basic) is None
    assert auth.cached("a/b", ("pull",)) == basic
    anonymous = RegistryAuth(username=None, password=None)
    assert anonymous.respond(['Basic realm="r"'], "a/b", ("pull",), None) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"token": "t", "expires_in": 300}', ("t", 300.0)),
        (b'{"access_token": "t"}', ("t", None)),
        (b'{"token": "", "access_token": "a"}', ("a", None)),
        (b'{"token": "t", "expires_in": "soon"}', ("t", None)),
        (b'{"token": ""}', None),
        (b'{"token": 5}', None),
        (b"[]", None),
        (b"<html>", None),
    ],
)
def test_parse_token_response(body: bytes, expected: tuple[str, float | None] | None) -> None:
    assert parse_token_response(body) == expected
