"""Registry authentication: WWW-Authenticate challenges, Basic and Docker token (Bearer) auth.

Pure bookkeeping, no I/O: `RegistryAuth` remembers the credentials, which scheme the registry
asked for and the tokens it was given, and says which Authorization value a request should
carry. Fetching a token is an HTTP request: `RegistryAuth.respond` names the token to fetch
(`TokenRequest`), the httpx auth flow in `oci.authflow` sends it, and the token server's answer
comes back through `parse_token_response` and `RegistryAuth.remember_token`.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "Challenge",
    "RegistryAuth",
    "TokenRequest",
    "merge_scopes",
    "parse_challenges",
    "parse_token_response",
]

_TOKEN_DEFAULT_TTL: Final = 60.0  # the Docker token spec's default for a missing expires_in
_ACTION_ORDER: Final = {"pull": 0, "push": 1, "delete": 2}


def _now() -> float:
    # Indirection so tests can move the clock for token expiry without patching `time`.
    return time.monotonic()


class Secret:
    """Holds a credential so that repr(), vars() and tracebacks never print it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"


@dataclass(frozen=True)
class Challenge:
    """One auth challenge of a ``WWW-Authenticate`` header; scheme and names are lower case."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


_TCHAR: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'
_SCHEME_RE: Final = re.compile(_TCHAR)
# Values are RFC 7235 tokens or quoted strings; bare values with ':' and '/' (unquoted realm
# URLs) are not valid tokens but some registries send them, so accept anything up to a comma.
_PARAM_RE: Final = re.compile(
    rf"(?P<name>{_TCHAR})[ \t]*=[ \t]*(?P<value>{_QUOTED}|[^\s,\"]+)(?=[ \t]*(?:,|$))"
)
_ESCAPE_RE: Final = re.compile(r"\\(.)")
_TOKEN68_RE: Final = re.compile(r"[ \t]+[A-Za-z0-9\-._~+/]+=*[ \t]*(?=,|$)")


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235 section 4.1) into challenges.

    One header may carry several challenges and quoted values may contain commas, so this
    scans rather than splitting on ``,``. Malformed trailing text is ignored: a partly
    understood challenge is still better than none.
    """
    challenges: list[Challenge] = []
    for value in values:
        pos = 0
        current: dict[str, str] | None = None
        while True:
            while pos < len(value) and value[pos] in " \t,":
                pos += 1
            if pos >= len(value):
                break
            if current is not None and (param := _PARAM_RE.match(value, pos)):
                raw = param.group("value")
                if raw.startswith('"'):
                    raw = _ESCAPE_RE.sub(r"\1", raw[1:-1])
                current.setdefault(param.group("name").lower(), raw)
                pos = param.end()
                continue
            scheme = _SCHEME_RE.match(value, pos)
            if scheme is None:
                break
            current = {}
            challenges.append(Challenge(scheme=scheme.group().lower(), params=current))
            pos = scheme.end()
            # A token68 (e.g. "Negotiate abc==") is of no use to us; skip it.
            if token68 := _TOKEN68_RE.match(value, pos):
                pos = token68.end()
    return challenges


def _parse_scopes(scope: str | None) -> dict[tuple[str, str], list[str]]:
    """``"repository:a/b:pull,push registry:catalog:*"`` -> {(type, name): actions}."""
    parsed: dict[tuple[str, str], list[str]] = {}
    for item in (scope or "").split():
        kind, _, rest = item.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name:
            continue
        merged = parsed.setdefault((kind, name), [])
        merged.extend(a for a in actions.split(",") if a and a not in merged)
    return parsed


def merge_scopes(challenged: str | None, repository: str | None, actions: tuple[str, ...]) -> str:
    """The challenge's scope plus what this request needs, in one canonical order.

    Canonical so that the scope computed before a request (to find a cached token) equals the
    one computed after the registry's challenge, whatever order the registry listed actions in.
    """
    scopes = _parse_scopes(challenged)
    if repository is not None:
        merged = scopes.setdefault(("repository", repository), [])
        merged.extend(a for a in actions if a not in merged)
    items = []
    for (kind, name), acts in sorted(scopes.items()):
        ordered = sorted(acts, key=lambda a: (_ACTION_ORDER.get(a, len(_ACTION_ORDER)), a))
        items.append(f"{kind}:{name}:{','.join(ordered)}")
    return " ".join(items)


@dataclass(frozen=True)
class TokenRequest:
    """A Docker token to fetch: ``GET realm?service=...&scope=...`` (one ``scope`` per item)."""

    realm: str
    service: str | None
    scope: str


def parse_token_response(body: bytes) -> tuple[str, float | None] | None:
    """(token, expires_in seconds or None) from a token server's JSON answer, None if no token.

    Docker's token servers say ``token``, OAuth2 ones ``access_token``; both are accepted.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token:
        return None
    expires_in = data.get("expires_in")
    return token, float(expires_in) if isinstance(expires_in, int | float) else None


class RegistryAuth:
    """Credentials for one registry and what its challenges taught us.

    Tokens are cached per (realm, service, scope); sharing an instance across threads is safe
    but may fetch a token twice.
    """

    def __init__(self, *, username: str | None, password: str | None) -> None:
        self.username = username
        self._password = Secret(password) if password is not None else None
        self._basic_header: Secret | None = None
        # An empty username (an unset setting) means anonymous, not a user named "".
        if username and password is not None:
            raw = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._basic_header = Secret(f"Basic {raw}")
        # Set once the registry has asked for Basic, so later requests skip the 401 round trip.
        self._use_basic = False
        # The last Bearer challenge's (realm, service): lets a cached token go out up front.
        self._bearer: tuple[str, str | None] | None = None
        self._tokens: dict[tuple[str, str | None, str], tuple[Secret, float]] = {}

    @property
    def basic_header(self) -> str | None:
        """The Basic Authorization value (also what a token server is asked with)."""
        return self._basic_header.value if self._basic_header is not None else None

    def cached(
        self, repository: str | None, actions: tuple[str, ...], extra_scope: str | None = None
    ) -> str | None:
        """The Authorization value to send up front, if an earlier answer makes one known."""
        if self._bearer is not None:
            realm, service = self._bearer
            cached = self._tokens.get(
                (realm, service, merge_scopes(extra_scope, repository, actions))
            )
            if cached is not None and cached[1] > _now():
                return f"Bearer {cached[0].value}"
            return None
        if self._use_basic and self._basic_header is not None:
            return self._basic_header.value
        return None

    def respond(
        self,
        challenge_headers: Iterable[str],
        repository: str | None,
        actions: tuple[str, ...],
        sent_auth: str | None,
        extra_scope: str | None = None,
    ) -> str | TokenRequest | None:
        """What to retry a 401 with: an Authorization value, a token to fetch first (then
        `remember_token`), or None if retrying cannot help."""
        challenges = parse_challenges(challenge_headers)
        for challenge in challenges:
            realm = challenge.params.get("realm")
            if challenge.scheme == "bearer" and realm:
                service = challenge.params.get("service")
                challenged = " ".join(filter(None, (challenge.params.get("scope"), extra_scope)))
                scope = merge_scopes(challenged, repository, actions)
                self._bearer = (realm, service)
                cached = self._tokens.get((realm, service, scope))
                # A cached token for this exact scope that we did not just send (the challenge
                # asked for more than we guessed) saves a token request; one that was just
                # refused must be replaced.
                if cached is not None and cached[1] > _now():
                    auth = f"Bearer {cached[0].value}"
                    if auth != sent_auth:
                        return auth
                return TokenRequest(realm, service, scope)
        if any(c.scheme == "basic" for c in challenges) and self._basic_header is not None:
            self._use_basic = True
            auth = self._basic_header.value
            # Sending the same credentials again would only earn the same 401.
            return None if auth == sent_auth else auth
        return None

    def remember_token(self, request: TokenRequest, token: str, expires_in: float | None) -> str:
        """Cache the token the realm gave for `request`; returns its Authorization value."""
        self._remember(request.realm, request.service, request.scope, token, expires_in)
        return f"Bearer {token}"

    def _remember(
        self, realm: str, service: str | None, scope: str, token: str, expires_in: float | None
    ) -> None:
        ttl = expires_in if expires_in is not None and expires_in > 0 else _TOKEN_DEFAULT_TTL
        # Renew a little early so a token does not expire between our check and the request.
        lifetime = max(ttl - 5.0, ttl / 2)
        self._tokens[(realm, service, scope)] = (Secret(token), _now() + lifetime)

    def secrets(self) -> list[str]:
        """Every credential value this object has seen, for redacting messages."""
        values = [token.value for token, _ in self._tokens.values()]
        if self._password is not None:
            values.append(self._password.value)
        if self._basic_header is not None:
            values.append(self._basic_header.value.removeprefix("Basic "))
        return [v for v in values if v]
