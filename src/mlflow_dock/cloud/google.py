"""Google Artifact Registry and Container Registry: hosts, access tokens, JSON keys.

`GoogleCredentials` is the credential provider: `oauth2accesstoken` plus an access token from
Google application default credentials, refreshed shortly before it expires (1 h). A
service-account key given as the password (`_json_key`, `_json_key_base64`) is a static
password; `validated_json_key` checks it at startup.

google-auth is imported only inside the functions that use it: a service pushing to Docker Hub
must not pay its import time. `translate_google_error` is the one mapping of google-auth
failures to retryable or permanent job errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from typing import Any

from mlflow_dock.cloud.credentials import Clock, Credentials, TokenCache, epoch, one_line
from mlflow_dock.errors import ConfigError, JobError, PermanentError, RetryableError
from mlflow_dock.oci.reference import registry_hostname

__all__ = [
    "DEFAULT_GOOGLE_REFRESH_MARGIN",
    "GOOGLE_JSON_KEY_BASE64_USERNAME",
    "GOOGLE_JSON_KEY_USERNAME",
    "GOOGLE_SCOPES",
    "GOOGLE_TOKEN_USERNAME",
    "GoogleCredentials",
    "is_google_host",
    "translate_google_error",
    "validated_json_key",
]

GOOGLE_TOKEN_USERNAME = "oauth2accesstoken"  # noqa: S105 - a fixed user name, not a secret
GOOGLE_JSON_KEY_USERNAME = "_json_key"
GOOGLE_JSON_KEY_BASE64_USERNAME = "_json_key_base64"
GOOGLE_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

# Google access tokens last 1 h; a push that starts with 5 min left finishes its auth handshake.
DEFAULT_GOOGLE_REFRESH_MARGIN = 5 * 60.0
# A token without an expiry (some credential types omit it) is assumed to last the usual hour.
_ASSUMED_GOOGLE_LIFETIME = 3600.0

_GOOGLE_HOST_RE = re.compile(r"[a-z0-9-]+-docker\.pkg\.dev|gcr\.io|[a-z0-9.-]+\.gcr\.io")


def is_google_host(host: str) -> bool:
    """Artifact Registry (`<location>-docker.pkg.dev`) or Container Registry (`[*.]gcr.io`)."""
    return _GOOGLE_HOST_RE.fullmatch(registry_hostname(host)) is not None


# -- tokens -----------------------------------------------------------------------------------


def translate_google_error(exc: BaseException, *, registry: str, action: str) -> JobError:
    """The one mapping from google-auth failures to retryable or permanent job errors."""
    import google.auth.exceptions as gae

    what = f"{action} for {registry}"
    reason = one_line(_google_reason(exc))
    if isinstance(exc, gae.DefaultCredentialsError):
        return PermanentError(f"{what}: no usable Google application default credentials: {reason}")
    if isinstance(exc, gae.TransportError | gae.TimeoutError):
        return RetryableError(f"{what}: cannot reach the Google token endpoint: {reason}")
    if isinstance(exc, gae.RefreshError):
        # google-auth marks 5xx/429/408 and "temporarily_unavailable" answers retryable (after
        # retrying them itself); a metadata-server RefreshError wraps the TransportError.
        if exc.retryable or isinstance(exc.__cause__, gae.TransportError):
            return RetryableError(f"{what}: Google token endpoint unavailable: {reason}")
        return PermanentError(f"{what}: Google refused the credentials: {reason}")
    if isinstance(exc, gae.GoogleAuthError):
        if exc.retryable:
            return RetryableError(f"{what}: {reason}")
        return PermanentError(f"{what}: {reason}")
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return RetryableError(f"{what}: cannot reach the Google token endpoint: {reason}")
    return PermanentError(f"{what}: {type(exc).__name__}: {reason}")


def _google_reason(exc: BaseException) -> str:
    # RefreshError's args are (details, response_data): the details alone are the readable
    # part, and the rest is the endpoint's raw answer.
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc) or type(exc).__name__


class GoogleCredentials:
    """`oauth2accesstoken` plus an access token from Google application default credentials
    (GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file, workload identity, the metadata
    server), refreshed when it is expired or within `refresh_margin` of expiring."""

    # A revoked or early-expired token is replaced by asking Google again.
    refreshable = True

    def __init__(
        self,
        *,
        registry_host: str,
        credentials_factory: Callable[[], Any] | None = None,
        request_factory: Callable[[], Any] | None = None,
        clock: Clock = time.time,
        refresh_margin: float = DEFAULT_GOOGLE_REFRESH_MARGIN,
        timeout: float = 30.0,
        on_token: Callable[[str], None] = lambda _token: None,
    ) -> None:
        self.registry_host = registry_hostname(registry_host)
        self._on_token = on_token
        self._credentials_factory = credentials_factory
        self._request_factory = request_factory
        self._clock = clock
        self._timeout = timeout
        self._google: Any = None
        self._request: Any = None
        self._cache = TokenCache(fetch=self._fetch, clock=clock, margin=refresh_margin)

    def __repr__(self) -> str:
        return f"GoogleCredentials(registry_host={self.registry_host!r})"

    def get(self) -> Credentials:
        return self._cache.get()

    def invalidate(self) -> None:
        self._cache.invalidate()

    def _fetch(self) -> tuple[Credentials, float]:
        # Runs under the cache's lock, which also serialises google-auth's refresh (the
        # credentials objects are not thread-safe).
        host = self.registry_host
        action = "getting a Google access token"
        try:
            if self._google is None:
                self._google = self._load()
            if self._request is None:
                self._request = self._make_request()
            self._google.refresh(self._request)
        except (ConfigError, JobError):
            raise
        except Exception as exc:
            raise translate_google_error(exc, registry=host, action=action) from exc
        token = getattr(self._google, "token", None)
        if not token:
            raise PermanentError(f"{action} for {host}: the credentials produced no token")
        self._on_token(str(token))
        now = self._clock()
        expiry = getattr(self._google, "expiry", None)
        # google-auth keeps expiry as a naive UTC datetime.
        expires_at = epoch(expiry, default=now + _ASSUMED_GOOGLE_LIFETIME)
        return Credentials(username=GOOGLE_TOKEN_USERNAME, password=str(token)), expires_at

    def _load(self) -> Any:
        if self._credentials_factory is not None:
            return self._credentials_factory()
        import google.auth

        credentials, _project = google.auth.default(scopes=list(GOOGLE_SCOPES))
        return credentials

    def _make_request(self) -> Any:
        if self._request_factory is not None:
            return self._request_factory()
        return _timeout_request(self._timeout)


def _timeout_request(timeout: float) -> Any:
    import google.auth.transport.requests as gar

    class _Request(gar.Request):
        # google-auth's default is 120 s per attempt, which would hold a build slot for
        # minutes behind a black-holed token endpoint.
        default_timeout: float = 30.0

        def __call__(
            self,
            url: str,
            method: str = "GET",
            body: Any = None,
            headers: Any = None,
            timeout: float | None = None,
            **kwargs: Any,
        ) -> Any:
            return super().__call__(  # type: ignore[no-untyped-call]
                url,
                method=method,
                body=body,
                headers=headers,
                timeout=timeout if timeout is not None else self.default_timeout,
                **kwargs,
            )

    request = _Request()
    request.default_timeout = timeout
    return request


# -- JSON keys as passwords --------------------------------------------------------------------


def validated_json_key(username: str, password: str) -> str:
    """The password to send for `_json_key`/`_json_key_base64`, checked now so a broken key
    fails at startup instead of as an opaque registry 401 on the first push."""
    variable = "DOCKER_REGISTRY_PASSWORD"
    value = password
    if username == GOOGLE_JSON_KEY_BASE64_USERNAME:
        # `base64` wraps at 76 columns unless told -w0; the line breaks are not part of the key.
        value = "".join(password.split())
        try:
            raw = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{variable}: DOCKER_USERNAME is {username} but the password is not valid "
                "base64 of a JSON key file"
            ) from None
    else:
        raw = password
    try:
        data = json.loads(raw)
    except ValueError as exc:
        position = (
            f" (line {exc.lineno} column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise ConfigError(
            f"{variable}: DOCKER_USERNAME is {username} but the password is not a JSON key "
            f"file{position}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{variable}: DOCKER_USERNAME is {username} but the password is not a JSON object"
        )
    missing = [k for k in ("client_email", "private_key") if not isinstance(data.get(k), str)]
    if data.get("type") != "service_account" or missing:
        detail = f"missing {', '.join(missing)}" if missing else "type is not service_account"
        raise ConfigError(
            f"{variable}: DOCKER_USERNAME is {username} but the password is not a "
            f"service-account key ({detail})"
        )
    return value
