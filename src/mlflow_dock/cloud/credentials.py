"""Registry credentials: static passwords, Amazon ECR tokens and Google access tokens.

A provider hands out a username/password pair per push or registry session. Cloud registries
issue short-lived passwords (ECR: 12 h, Google: 1 h), so the cloud providers fetch them from the
ambient cloud identity (instance role, workload identity, key file) and cache them until shortly
before they expire. `make_provider` picks the provider from the settings.

boto3 and google-auth are imported only inside the functions that use them: a service pushing to
Docker Hub must not pay their import time, and neither may the CLI's startup.

Secrets never appear in a message, a log line or a repr: errors name the registry and the
failure, and translate the cloud SDKs' exceptions in one function per SDK.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from mlflow_dock.errors import ConfigError, JobError, PermanentError, RetryableError
from mlflow_dock.oci.reference import registry_hostname

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Wall-clock seconds since the epoch; cloud tokens carry absolute expiry times."""

ECR_USERNAME = "AWS"
GOOGLE_TOKEN_USERNAME = "oauth2accesstoken"  # noqa: S105 - a fixed user name, not a secret
GOOGLE_JSON_KEY_USERNAME = "_json_key"
GOOGLE_JSON_KEY_BASE64_USERNAME = "_json_key_base64"
GOOGLE_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

# ECR tokens last 12 h; refreshing 15 min early leaves room for a long push and clock skew.
DEFAULT_ECR_REFRESH_MARGIN = 15 * 60.0
# Google access tokens last 1 h; a push that starts with 5 min left finishes its auth handshake.
DEFAULT_GOOGLE_REFRESH_MARGIN = 5 * 60.0
# A token without an expiry (some credential types omit it) is assumed to last the usual hour.
_ASSUMED_GOOGLE_LIFETIME = 3600.0
_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class Credentials:
    """One username/password pair for a registry; `repr` and `str` hide the password."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"

    __str__ = __repr__

    def auth_config(self) -> dict[str, str]:
        """The per-push `auth_config` of the Docker Engine API (never written to disk)."""
        return {"username": self.username, "password": self.password}


@runtime_checkable
class CredentialProvider(Protocol):
    def get(self) -> Credentials:
        """Current credentials; cheap while cached, thread-safe."""
        ...

    def invalidate(self) -> None:
        """Forget a cached token (after a registry 401) so the next `get` fetches a new one."""
        ...


class StaticCredentials:
    """The username and password exactly as configured."""

    def __init__(self, *, username: str, password: str) -> None:
        self._credentials = Credentials(username=username, password=password)

    def get(self) -> Credentials:
        return self._credentials

    def invalidate(self) -> None:
        # Nothing to refetch: a rejected static password stays rejected.
        return None

    def __repr__(self) -> str:
        return f"StaticCredentials(username={self._credentials.username!r})"


# -- hosts ------------------------------------------------------------------------------------

_REGION = r"[a-z]{2}(?:-[a-z]+)+-\d+"
_ECR_HOST_RE = re.compile(
    rf"(?P<account>\d{{12}})\.dkr\.ecr(?P<fips>-fips)?\.(?P<region>{_REGION})"
    r"\.amazonaws\.com(?:\.cn)?"
)
# IPv6-capable registry endpoints: <account>.dkr-ecr.<region>.on.aws.
_ECR_DUALSTACK_HOST_RE = re.compile(
    rf"(?P<account>\d{{12}})\.dkr-ecr(?P<fips>-fips)?\.(?P<region>{_REGION})\.on\.aws"
)
_GOOGLE_HOST_RE = re.compile(r"[a-z0-9-]+-docker\.pkg\.dev|gcr\.io|[a-z0-9.-]+\.gcr\.io")


@dataclass(frozen=True)
class EcrRegistry:
    host: str
    account_id: str
    region: str
    fips: bool = False
    dualstack: bool = False


def parse_ecr_host(host: str) -> EcrRegistry:
    """Account and region of an ECR registry host, or ConfigError if it is not one."""
    name = registry_hostname(host)
    match = _ECR_HOST_RE.fullmatch(name)
    dualstack = False
    if match is None:
        match = _ECR_DUALSTACK_HOST_RE.fullmatch(name)
        dualstack = True
    if match is None:
        raise ConfigError(
            f"DOCKER_REGISTRY: {name} is not an Amazon ECR registry "
            "(<account>.dkr.ecr.<region>.amazonaws.com)"
        )
    return EcrRegistry(
        host=name,
        account_id=match["account"],
        region=match["region"],
        fips=bool(match["fips"]),
        dualstack=dualstack,
    )


def is_ecr_host(host: str) -> bool:
    try:
        parse_ecr_host(host)
    except ConfigError:
        return False
    return True


def is_google_host(host: str) -> bool:
    """Artifact Registry (`<location>-docker.pkg.dev`) or Container Registry (`[*.]gcr.io`)."""
    return _GOOGLE_HOST_RE.fullmatch(registry_hostname(host)) is not None


# -- shared caching ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MESSAGE_LIMIT else line[: _MESSAGE_LIMIT - 3] + "..."


@dataclass(frozen=True)
class _Entry:
    credentials: Credentials
    refresh_at: float
    expires_at: float
    # Set after a transient refresh failure: until then the old token is served untried.
    retry_at: float = 0.0


class _TokenCache:
    """Credentials cached until `margin` before they expire, refreshed by one thread at a time.

    Readers take the fast path without the lock (reading one attribute is atomic); callers that
    find the token stale queue on the lock, so N concurrent pushes cause one fetch, not N.

    A transient refresh failure inside the margin is not a job failure: the old token still
    works, so it is served (and the refresh retried after `retry_interval`) until it is within
    `grace` of expiring; only then does the RetryableError reach the caller.
    """

    def __init__(
        self,
        *,
        fetch: Callable[[], tuple[Credentials, float]],
        clock: Clock,
        margin: float,
        grace: float = 60.0,
        retry_interval: float = 30.0,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._margin = margin
        self._grace = grace
        self._retry_interval = retry_interval
        self._lock = threading.Lock()
        self._entry: _Entry | None = None

    def _fresh(self, entry: _Entry | None, now: float) -> bool:
        if entry is None:
            return False
        if now < entry.refresh_at:
            return True
        return now < entry.retry_at and now < entry.expires_at - self._grace

    def get(self) -> Credentials:
        entry = self._entry
        if entry is not None and self._fresh(entry, self._clock()):
            return entry.credentials
        with self._lock:
            entry = self._entry
            now = self._clock()
            if entry is not None and self._fresh(entry, now):
                return entry.credentials
            try:
                credentials, expires_at = self._fetch()
            except RetryableError as exc:
                if entry is None or now >= entry.expires_at - self._grace:
                    raise
                logger.warning(
                    "%s; using the current token (expires in %.0f s), retrying in %.0f s",
                    exc,
                    entry.expires_at - now,
                    self._retry_interval,
                )
                self._entry = _Entry(
                    entry.credentials,
                    entry.refresh_at,
                    entry.expires_at,
                    retry_at=now + self._retry_interval,
                )
                return entry.credentials
            self._entry = _Entry(credentials, expires_at - self._margin, expires_at)
            return credentials

    def invalidate(self) -> None:
        with self._lock:
            self._entry = None


# -- Amazon ECR -------------------------------------------------------------------------------


def translate_aws_error(exc: BaseException, *, registry: str, action: str) -> JobError:
    """The one mapping from boto3/botocore failures to retryable or permanent job errors."""
    import botocore.exceptions as bce

    what = f"{action} for {registry}"
    if isinstance(
        exc,
        bce.NoCredentialsError
        | bce.PartialCredentialsError
        | bce.CredentialRetrievalError
        | bce.ProfileNotFound
        | bce.NoRegionError,
    ):
        return PermanentError(f"{what}: no usable AWS credentials: {_one_line(str(exc))}")
    if isinstance(exc, bce.TokenRetrievalError | bce.SSOError):
        return PermanentError(f"{what}: AWS SSO login expired or missing: {_one_line(str(exc))}")
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = _one_line(str(error.get("Message", "")))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"{what}: {code}" + (f": {message}" if message else "")
        if code in _AWS_AUTH_CODES:
            return PermanentError(detail)
        if code in _AWS_THROTTLING_CODES or status == 429 or status >= 500:
            return RetryableError(detail)
        return PermanentError(detail)
    if isinstance(exc, bce.SSLError) and "CERTIFICATE_VERIFY_FAILED" not in str(exc):
        return RetryableError(f"{what}: TLS error: {_one_line(str(exc))}")
    if isinstance(exc, bce.SSLError):
        return PermanentError(f"{what}: TLS certificate rejected: {_one_line(str(exc))}")
    if isinstance(
        exc,
        bce.EndpointConnectionError
        | bce.ConnectionError
        | bce.HTTPClientError
        | bce.ConnectionClosedError,
    ):
        return RetryableError(f"{what}: cannot reach the AWS API: {_one_line(str(exc))}")
    return PermanentError(f"{what}: {type(exc).__name__}: {_one_line(str(exc))}")


_AWS_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "UnauthorizedOperation",
        "AuthFailure",
    }
)
_AWS_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
        "ServerException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def aws_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")) or None
    return None


class EcrCredentials:
    """`AWS` plus an ECR authorization token from the ambient AWS identity, cached until near
    expiry. Uses boto3's usual credential chain: env vars, profile, SSO, IRSA, instance role."""

    def __init__(
        self,
        *,
        registry_host: str,
        endpoint_url: str | None = None,
        session: Any | None = None,
        client_factory: Callable[[], Any] | None = None,
        clock: Clock = time.time,
        refresh_margin: float = DEFAULT_ECR_REFRESH_MARGIN,
        on_token: Callable[[str], None] = lambda _token: None,
    ) -> None:
        self.registry = parse_ecr_host(registry_host)
        # Told every fetched token (e.g. a log redactor learning it); never sees it logged.
        self._on_token = on_token
        self._endpoint_url = endpoint_url
        self._session = session
        self._client_factory = client_factory
        self._clock = clock
        self._margin = refresh_margin
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._cache = _TokenCache(fetch=self._fetch, clock=clock, margin=refresh_margin)
        self._warned_short_lived = False

    def __repr__(self) -> str:
        return (
            f"EcrCredentials(account={self.registry.account_id!r}, region={self.registry.region!r})"
        )

    def get(self) -> Credentials:
        return self._cache.get()

    def invalidate(self) -> None:
        self._cache.invalidate()

    def ecr_client(self) -> Any:
        """The provider's boto3 ECR client (one per provider; clients are thread-safe)."""
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = self._make_client()
                except Exception as exc:
                    raise translate_aws_error(
                        exc, registry=self.registry.host, action="creating an ECR client"
                    ) from exc
            return self._client

    def _make_client(self) -> Any:
        if self._client_factory is not None:
            return self._client_factory()
        import boto3.session
        from botocore.config import Config

        # botocore refuses FIPS/dual-stack together with a custom endpoint; the custom endpoint
        # (a test server or a VPC endpoint) already decides where requests go.
        custom = self._endpoint_url is not None
        config = Config(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=30,
            use_fips_endpoint=self.registry.fips and not custom,
            use_dualstack_endpoint=self.registry.dualstack and not custom,
            user_agent_extra="mlflow-dock",
        )
        # Sessions are not thread-safe, clients are: one client per provider, made under a lock.
        session = self._session if self._session is not None else boto3.session.Session()
        return session.client(
            "ecr",
            region_name=self.registry.region,
            endpoint_url=self._endpoint_url,
            config=config,
        )

    def _fetch(self) -> tuple[Credentials, float]:
        client = self.ecr_client()
        host = self.registry.host
        try:
            # No registryIds: the parameter is deprecated and the token works for every
            # registry the identity may access, including other accounts' registries.
            response = client.get_authorization_token()
        except Exception as exc:
            raise translate_aws_error(
                exc, registry=host, action="getting an ECR authorization token"
            ) from exc
        entries = response.get("authorizationData") or []
        if not entries:
            raise PermanentError(f"getting an ECR authorization token for {host}: none returned")
        entry = entries[0]
        try:
            decoded = base64.b64decode(entry["authorizationToken"], validate=True).decode("utf-8")
        except (KeyError, TypeError, binascii.Error, UnicodeDecodeError):
            raise PermanentError(
                f"getting an ECR authorization token for {host}: malformed token"
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep or not username or not password:
            raise PermanentError(
                f"getting an ECR authorization token for {host}: malformed token"
            ) from None
        self._on_token(password)
        self._on_token(str(entry["authorizationToken"]))
        now = self._clock()
        expires_at = _epoch(entry.get("expiresAt"), default=now + 3600.0)
        if expires_at - self._margin <= now and not self._warned_short_lived:
            # Happens with a badly skewed clock (or a fake ECR); the token is still used, just
            # fetched again on every call instead of being cached.
            self._warned_short_lived = True
            logger.warning(
                "ECR token for %s expires at %s, within %.0f s of now: not caching it "
                "(is the system clock right?)",
                host,
                datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds"),
                self._margin,
            )
        logger.debug("fetched an ECR token for %s, valid until %s", host, expires_at)
        return Credentials(username=username, password=password), expires_at


def _epoch(value: Any, *, default: float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return float(value.timestamp())
    if isinstance(value, int | float):
        return float(value)
    return default


# -- Google Artifact Registry / Container Registry --------------------------------------------


def translate_google_error(exc: BaseException, *, registry: str, action: str) -> JobError:
    """The one mapping from google-auth failures to retryable or permanent job errors."""
    import google.auth.exceptions as gae

    what = f"{action} for {registry}"
    reason = _one_line(_google_reason(exc))
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
        self._cache = _TokenCache(fetch=self._fetch, clock=clock, margin=refresh_margin)

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
        expires_at = _epoch(expiry, default=now + _ASSUMED_GOOGLE_LIFETIME)
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


def _validated_json_key(username: str, password: str) -> str:
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


# -- choosing a provider ----------------------------------------------------------------------


def make_provider(
    *,
    registry: str,
    username: str | None,
    password: str | None,
    ecr_endpoint_url: str | None = None,
    ecr_create_repositories: bool = False,
    on_token: Callable[[str], None] = lambda _token: None,
) -> CredentialProvider:
    """The provider for DOCKER_REGISTRY / DOCKER_USERNAME / DOCKER_REGISTRY_PASSWORD.

    A configured password always wins (including a Google `_json_key`); without one, ECR and
    Google registries use the ambient cloud identity and every other registry is an error.
    """
    host = registry_hostname(registry)
    if not host:
        raise ConfigError("DOCKER_REGISTRY must name a registry host")
    if ecr_endpoint_url and not is_ecr_host(host):
        raise ConfigError(
            f"MLFLOW_DOCK_ECR_ENDPOINT_URL is set but DOCKER_REGISTRY ({host}) is not an "
            "Amazon ECR registry"
        )
    if ecr_create_repositories and not is_ecr_host(host):
        raise ConfigError("MLFLOW_DOCK_ECR_CREATE_REPOSITORIES needs an Amazon ECR DOCKER_REGISTRY")
    if password is not None and password.strip():
        if not username:
            raise ConfigError("DOCKER_USERNAME is required when DOCKER_REGISTRY_PASSWORD is set")
        if username in (GOOGLE_JSON_KEY_USERNAME, GOOGLE_JSON_KEY_BASE64_USERNAME):
            password = _validated_json_key(username, password)
        return StaticCredentials(username=username, password=password)
    if is_ecr_host(host):
        _note_ignored_username(username, ECR_USERNAME, host)
        return EcrCredentials(registry_host=host, endpoint_url=ecr_endpoint_url, on_token=on_token)
    if is_google_host(host):
        _note_ignored_username(username, GOOGLE_TOKEN_USERNAME, host)
        return GoogleCredentials(registry_host=host, on_token=on_token)
    raise ConfigError(
        f"DOCKER_REGISTRY_PASSWORD is required for {host} (only Amazon ECR and Google "
        "Artifact Registry / Container Registry hosts can use cloud credentials instead)"
    )


def _note_ignored_username(username: str | None, used: str, host: str) -> None:
    if username and username != used:
        logger.warning(
            "DOCKER_USERNAME %r is ignored for %s: without DOCKER_REGISTRY_PASSWORD the "
            "cloud credentials log in as %r",
            username,
            host,
            used,
        )
