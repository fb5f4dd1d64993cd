"""Amazon ECR: registry hosts, tokens from the ambient AWS identity, and ECR's own API.

`EcrCredentials` is the credential provider: `AWS` plus an authorization token from boto3's
usual credential chain, cached until shortly before it expires (12 h). `EcrRepositories` is
what a job does with the same boto3 client where ECR, unlike most registries, needs its own
API: creating repositories (ECR refuses pushes to a repository nobody created) and deleting one
tag (the registry client's tag-deletion strategy on ECR, chosen in `app.py`).

boto3 is imported only inside the functions that use it: a service pushing to Docker Hub must
not pay its import time, and neither may the CLI's startup. `translate_aws_error` is the one
mapping of boto3/botocore failures to retryable or permanent job errors.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow_dock.cloud.credentials import Clock, Credentials, TokenCache, epoch, one_line
from mlflow_dock.errors import ConfigError, JobError, PermanentError, RetryableError
from mlflow_dock.oci.reference import registry_hostname

__all__ = [
    "DEFAULT_ECR_REFRESH_MARGIN",
    "ECR_USERNAME",
    "EcrCredentials",
    "EcrRegistry",
    "EcrRepositories",
    "aws_error_code",
    "is_ecr_host",
    "parse_ecr_host",
    "translate_aws_error",
]

logger = logging.getLogger(__name__)

ECR_USERNAME = "AWS"
# ECR tokens last 12 h; refreshing 15 min early leaves room for a long push and clock skew.
DEFAULT_ECR_REFRESH_MARGIN = 15 * 60.0


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


# -- errors -----------------------------------------------------------------------------------


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
        return PermanentError(f"{what}: no usable AWS credentials: {one_line(str(exc))}")
    if isinstance(exc, bce.TokenRetrievalError | bce.SSOError):
        return PermanentError(f"{what}: AWS SSO login expired or missing: {one_line(str(exc))}")
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = one_line(str(error.get("Message", "")))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"{what}: {code}" + (f": {message}" if message else "")
        if code in _AWS_AUTH_CODES:
            return PermanentError(detail)
        if code in _AWS_THROTTLING_CODES or status == 429 or status >= 500:
            return RetryableError(detail)
        return PermanentError(detail)
    if isinstance(exc, bce.SSLError) and "CERTIFICATE_VERIFY_FAILED" not in str(exc):
        return RetryableError(f"{what}: TLS error: {one_line(str(exc))}")
    if isinstance(exc, bce.SSLError):
        return PermanentError(f"{what}: TLS certificate rejected: {one_line(str(exc))}")
    if isinstance(
        exc,
        bce.EndpointConnectionError
        | bce.ConnectionError
        | bce.HTTPClientError
        | bce.ConnectionClosedError,
    ):
        return RetryableError(f"{what}: cannot reach the AWS API: {one_line(str(exc))}")
    return PermanentError(f"{what}: {type(exc).__name__}: {one_line(str(exc))}")


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

    # A revoked or early-expired token is replaced by asking AWS again.
    refreshable = True

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
        self._cache = TokenCache(fetch=self._fetch, clock=clock, margin=refresh_margin)
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
        expires_at = epoch(entry.get("expiresAt"), default=now + 3600.0)
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


# -- ECR's own API ----------------------------------------------------------------------------


class EcrRepositories:
    """Repository creation and tag deletion for the registry of one `EcrCredentials`.

    `delete_tag` has the signature of the registry client's tag-deletion strategy
    (`oci.remote.DeleteTag`), so `app.py` hands it to the client for an ECR registry.
    """

    def __init__(self, credentials: EcrCredentials) -> None:
        self._credentials = credentials
        self._registry = credentials.registry
        self._known_repositories: set[str] = set()

    def ensure_repository(self, name: str) -> None:
        """Create the ECR repository `name` (path inside the registry) unless it exists.

        ECR, unlike most registries, refuses pushes to a repository nobody created.
        """
        repository = name.strip("/")
        repository = repository.removeprefix(f"{self._registry.host}/")
        if repository in self._known_repositories:
            return
        client = self._credentials.ecr_client()
        registry_id = self._registry.account_id
        try:
            client.describe_repositories(registryId=registry_id, repositoryNames=[repository])
        except Exception as exc:
            if aws_error_code(exc) != "RepositoryNotFoundException":
                raise translate_aws_error(
                    exc, registry=self._registry.host, action=f"looking up repository {repository}"
                ) from exc
            self._create_repository(client, repository)
        # set.add is atomic; a lost race only costs one more DescribeRepositories.
        self._known_repositories.add(repository)

    def delete_tag(self, name: str, tag: str) -> bool:
        """Remove one tag with ECR's BatchDeleteImage by tag: the image itself stays while any
        other tag (or digest reference) uses it, unlike a DELETE of the manifest."""
        repository = name.strip("/").removeprefix(f"{self._registry.host}/")
        try:
            response = self._credentials.ecr_client().batch_delete_image(
                registryId=self._registry.account_id,
                repositoryName=repository,
                imageIds=[{"imageTag": tag}],
            )
        except Exception as exc:
            raise translate_aws_error(
                exc, registry=self._registry.host, action=f"deleting tag {repository}:{tag}"
            ) from exc
        for failure in response.get("failures") or []:
            # A tag that is already gone is the outcome we wanted.
            if failure.get("failureCode") != "ImageNotFound":
                raise PermanentError(
                    f"ECR {self._registry.host} refused deleting tag {repository}:{tag}: "
                    f"{failure.get('failureCode')}: {failure.get('failureReason')}"
                )
        return True

    def _create_repository(self, client: Any, repository: str) -> None:
        try:
            # MUTABLE because alias tags (e.g. "champion") move from version to version.
            client.create_repository(
                registryId=self._registry.account_id,
                repositoryName=repository,
                imageTagMutability="MUTABLE",
            )
        except Exception as exc:
            # Another worker (or person) created it between our two calls: that is success.
            if aws_error_code(exc) == "RepositoryAlreadyExistsException":
                return
            raise translate_aws_error(
                exc, registry=self._registry.host, action=f"creating repository {repository}"
            ) from exc
        logger.info("created ECR repository %s in %s", repository, self._registry.host)
