"""Tests for mlflow_dock.oci.auth: WWW-Authenticate parsing (the HTTP flows are in test_remote)."""

from __future__ import annotations

import pytest

from mlflow_dock.oci.auth import Challenge, RegistryAuth, parse_challenges


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
