"""The registry's authentication dance as an httpx auth flow.

`RegistryClient` sends each request with ``auth=login.flow(...)``: an :class:`httpx.Auth` whose
flow (HTTPX's generator protocol: yield a request, receive its response) does what registries
ask of a client:

* up front, the Authorization an earlier answer made known (Basic once the registry asked for
  it, a cached Bearer token for this request's scope), or none (anonymous);
* on a 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``, a token for the
  challenged scope plus what this request needs (a mount also needs pull on its source), asked
  of the realm with our Basic credentials (or anonymously), cached per scope, and the request
  sent again; on ``Basic``, the request sent again with our credentials;
* when the registry (or its token server) still refuses and the credentials are refreshable
  (cloud tokens), fresh credentials once per client, and the request from the start.

The token request and any redirect of it are yielded like the request itself, so HTTPX sends
them on the same connection pool with the same timeouts. The flow overrides ``sync_auth_flow``
rather than ``auth_flow`` because it reads token responses and may call the credential refresh,
which fetches a cloud token (I/O); it is therefore sync-only.

Bookkeeping (challenges, scopes, the token cache) is pure and lives in :mod:`oci.auth`;
failures are worded by :class:`oci.errors.RegistryErrors`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator
from typing import Final

import httpx

from mlflow_dock.oci.auth import RegistryAuth, TokenRequest, parse_token_response
from mlflow_dock.oci.errors import Op, RegistryError, RegistryErrors

__all__ = ["RefreshCredentials", "RegistryLogin", "RequestAuth"]

RefreshCredentials = Callable[[], tuple[str | None, str | None]]
"""Fresh (username, password) for a registry that refused ours (e.g. a new cloud token)."""

_FlowStep = Generator[httpx.Request, httpx.Response, None]

# The header httpx's client adds to its own requests, carried over to token requests.
_USER_AGENT: Final = "User-Agent"


class RegistryLogin:
    """What one registry client knows about logging in: its credentials, what the registry's
    challenges taught it, its tokens, and the one credential refresh it may make.

    Shared by every request of the client (tokens are cached per scope across requests);
    sharing across threads is safe but may fetch a token twice.
    """

    def __init__(
        self,
        *,
        username: str | None,
        password: str | None,
        scheme: str,
        refresh: RefreshCredentials | None = None,
    ) -> None:
        self._auth = RegistryAuth(username=username, password=password)
        # An https registry has no reason to send our password to a plain-http realm.
        self._https = scheme == "https"
        # Asked once per client for a fresh (username, password) when the registry still
        # answers 401 with ours: a cloud token can be revoked or expire mid-job.
        self._refresh = refresh
        # Credentials replaced by a refresh are still blanked in messages.
        self._retired: list[str] = []

    @property
    def auth(self) -> RegistryAuth:
        return self._auth

    @property
    def username(self) -> str | None:
        return self._auth.username

    @property
    def refreshable(self) -> bool:
        return self._refresh is not None

    def refresh(self) -> bool:
        """Swap in fresh credentials (once per client); False if there is nothing to refresh."""
        refresh, self._refresh = self._refresh, None
        if refresh is None:
            return False
        username, password = refresh()
        self._retired.extend(self._auth.secrets())
        self._auth = RegistryAuth(username=username, password=password)
        return True

    def secrets(self) -> list[str]:
        """Every credential value this login has used, for redacting messages."""
        return [*self._auth.secrets(), *self._retired]

    @property
    def https(self) -> bool:
        return self._https

    def flow(
        self,
        op: Op,
        errors: RegistryErrors,
        actions: tuple[str, ...],
        *,
        extra_scope: str | None = None,
    ) -> RequestAuth:
        """The auth of one request: ``actions`` on ``op.repository`` (none: no repository, as
        for ``/v2/``), plus ``extra_scope`` (e.g. pull on a mount's source)."""
        repository = op.repository if actions else None
        return RequestAuth(self, op, errors, repository, actions, extra_scope)


class RequestAuth(httpx.Auth):
    """One request's auth flow (see the module docstring); made by `RegistryLogin.flow`."""

    def __init__(
        self,
        login: RegistryLogin,
        op: Op,
        errors: RegistryErrors,
        repository: str | None,
        actions: tuple[str, ...],
        extra_scope: str | None,
    ) -> None:
        self._login = login
        self._op = op
        self._errors = errors
        self._repository = repository
        self._actions = actions
        self._extra_scope = extra_scope

    def sync_auth_flow(self, request: httpx.Request) -> _FlowStep:
        login = self._login
        sent = login.auth.cached(self._repository, self._actions, self._extra_scope)
        response = yield _authorized(request, sent)
        while response.status_code == 401:
            retry: str | None = None
            try:
                retry = yield from self._answer(login.auth, request, response, sent)
            except RegistryError as exc:
                # The token service refused our credentials: the same case as a 401 below.
                if exc.status_code != 401 or not login.refreshable:
                    raise
            if retry is not None:
                sent = retry
                response = yield _authorized(request, retry)
                if response.status_code != 401:
                    return
            if not login.refresh():
                return
            # New credentials, nothing learnt yet: from the start, as a first request.
            sent = login.auth.cached(self._repository, self._actions, self._extra_scope)
            response = yield _authorized(request, sent)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        # The refresh may fetch a cloud token with blocking I/O; RegistryClient is sync.
        raise TypeError("RequestAuth works with httpx.Client only")
        yield request  # pragma: no cover - makes this an async generator

    def _answer(
        self,
        auth: RegistryAuth,
        request: httpx.Request,
        response: httpx.Response,
        sent: str | None,
    ) -> Generator[httpx.Request, httpx.Response, str | None]:
        """The Authorization to retry a 401 with (fetching a token if need be), or None."""
        step = auth.respond(
            response.headers.get_list("WWW-Authenticate"),
            self._repository,
            self._actions,
            sent,
            self._extra_scope,
        )
        if not isinstance(step, TokenRequest):
            return step
        token, expires_in = yield from self._fetch_token(auth, request, step)
        return auth.remember_token(step, token, expires_in)

    def _fetch_token(
        self, auth: RegistryAuth, request: httpx.Request, wanted: TokenRequest
    ) -> Generator[httpx.Request, httpx.Response, tuple[str, float | None]]:
        """A new token from the realm and its lifetime in seconds (if the server said)."""
        host = self._errors.host
        try:
            realm_scheme = httpx.URL(wanted.realm).scheme
        except httpx.InvalidURL:
            realm_scheme = ""
        if realm_scheme not in {"http", "https"}:
            raise self._errors.fail(
                f"registry {host} sent an unusable token realm {wanted.realm!r}"
            )
        if realm_scheme == "http" and self._login.https:
            # Our password would cross the network in clear text to a realm chosen by whoever
            # answered; an https registry has no reason to ask for that.
            raise self._errors.fail(
                f"registry {host} sent a plain-http token realm {wanted.realm!r}"
            )
        query = httpx.QueryParams({"service": wanted.service} if wanted.service else {})
        for item in wanted.scope.split():
            query = query.add("scope", item)
        headers = {_USER_AGENT: request.headers.get(_USER_AGENT, "mlflow-dock")}
        if auth.basic_header is not None:
            headers["Authorization"] = auth.basic_header
        # The client's timeouts travel in the request's extensions; a bare Request has none.
        extensions = {k: v for k, v in request.extensions.items() if k == "timeout"}
        token_request = httpx.Request(
            "GET", wanted.realm, params=query, headers=headers, extensions=extensions
        )
        response = yield token_request
        # Token servers may redirect; httpx sets next_request when the request being
        # authenticated does not follow redirects itself (a PUT), and drops our Authorization
        # when the redirect leaves the realm's origin.
        while response.next_request is not None:
            response = yield response.next_request
        response.read()
        op = Op(self._op.doing, self._op.repository, self._op.reference, kind="token")
        if response.status_code != 200:
            raise self._errors.error(op, response=response)
        answer = parse_token_response(response.content)
        if answer is None:
            raise self._errors.fail(f"token server of registry {host} returned no token")
        return answer


def _authorized(request: httpx.Request, authorization: str | None) -> httpx.Request:
    """A copy of ``request`` carrying ``authorization`` (or none).

    A copy, not the request changed in place, so each attempt is its own request (logs and
    transports see what was really sent). The body stream is shared: RegistryClient gives
    streams that can be iterated again, so a retried upload is sent in full.
    """
    headers = request.headers.copy()
    if authorization is None:
        headers.pop("Authorization", None)
    else:
        headers["Authorization"] = authorization
    return httpx.Request(
        request.method,
        request.url,
        headers=headers,
        stream=request.stream,
        extensions=request.extensions,
    )
