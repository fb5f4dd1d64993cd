"""Registry credential providers against local servers that speak the real APIs.

ECR: moto in server mode, reached by real boto3 clients over HTTP. Google: a service-account key
file whose token_uri is a local OAuth2 token endpoint that verifies the signed JWT-bearer grant,
reached through google.auth.default(). Nothing here leaves 127.0.0.1: the AWS instance-metadata
and Google metadata-server lookups are switched off in the environment.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mlflow_dock.cloud.credentials import (
    CredentialProvider,
    Credentials,
    EcrCredentials,
    GoogleCredentials,
    StaticCredentials,
    is_ecr_host,
    is_google_host,
    make_provider,
    parse_ecr_host,
    translate_aws_error,
)
from mlflow_dock.cloud.ecr import EcrRepositories
from mlflow_dock.errors import ConfigError, PermanentError, RetryableError

ACCOUNT = "123456789012"  # moto's default account
REGION = "eu-west-1"
ECR_HOST = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
MOTO_PASSWORD = f"{ACCOUNT}-auth-token"  # what moto issues for its default account
# moto stamps every token with this expiry, so tests pin the clock relative to it.
MOTO_EXPIRES_AT = datetime(2015, 1, 1, tzinfo=UTC).timestamp()
GAR_HOST = "europe-west4-docker.pkg.dev"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- hosts and make_provider ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "account", "region", "fips", "dualstack"),
    [
        (ECR_HOST, ACCOUNT, REGION, False, False),
        ("210987654321.dkr.ecr.us-east-1.amazonaws.com", "210987654321", "us-east-1", False, False),
        (
            f"{ACCOUNT}.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
            ACCOUNT,
            "us-gov-west-1",
            True,
            False,
        ),
        (f"{ACCOUNT}.dkr.ecr.cn-north-1.amazonaws.com.cn", ACCOUNT, "cn-north-1", False, False),
        (
            f"{ACCOUNT}.dkr.ecr.ap-southeast-2.amazonaws.com/team/x",
            ACCOUNT,
            "ap-southeast-2",
            False,
            False,
        ),
        (
            f"https://{ACCOUNT}.DKR.ECR.eu-central-2.amazonaws.com:443/",
            ACCOUNT,
            "eu-central-2",
            False,
            False,
        ),
        (f"{ACCOUNT}.dkr-ecr.eu-west-1.on.aws", ACCOUNT, "eu-west-1", False, True),
    ],
)
def test_parse_ecr_host(host: str, account: str, region: str, fips: bool, dualstack: bool) -> None:
    parsed = parse_ecr_host(host)
    assert (parsed.account_id, parsed.region, parsed.fips, parsed.dualstack) == (
        account,
        region,
        fips,
        dualstack,
    )
    assert is_ecr_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "docker.io",
        "public.ecr.aws",  # ECR Public: another API, static credentials only
        "12345678901.dkr.ecr.eu-west-1.amazonaws.com",  # 11 digits
        f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com.evil.example",
        f"{ACCOUNT}.dkr.ecr.amazonaws.com",
        "us-central1-docker.pkg.dev",
    ],
)
def test_not_ecr_hosts(host: str) -> None:
    assert not is_ecr_host(host)
    with pytest.raises(ConfigError, match="not an Amazon ECR registry"):
        parse_ecr_host(host)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("us-central1-docker.pkg.dev", True),
        ("us-central1-docker.pkg.dev/proj/repo", True),
        ("europe-docker.pkg.dev", True),
        ("gcr.io", True),
        ("eu.gcr.io/my-project", True),
        ("marketplace.gcr.io", True),
        ("docker.pkg.dev", False),
        ("pkg.dev", False),
        ("evilgcr.io", False),
        ("gcr.io.evil.example", False),
        ("us-central1-docker.pkg.dev.evil.example", False),
        ("ghcr.io", False),
        (ECR_HOST, False),
    ],
)
def test_is_google_host(host: str, expected: bool) -> None:
    assert is_google_host(host) is expected


def _service_account_info(token_uri: str = "https://oauth2.googleapis.com/token") -> dict[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": "pusher@test-project.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }


@pytest.fixture(scope="module")
def json_key() -> str:
    return json.dumps(_service_account_info(), indent=2)


@pytest.mark.parametrize(
    ("registry", "username", "password", "kind"),
    [
        ("docker.io", "alice", "s3cret", StaticCredentials),
        ("ghcr.io/acme", "alice", "s3cret", StaticCredentials),
        (ECR_HOST, "AWS", "pre-fetched-token", StaticCredentials),
        (ECR_HOST, None, None, EcrCredentials),
        (ECR_HOST, "AWS", "", EcrCredentials),  # empty means unset
        (f"{ECR_HOST}/team", "someone", None, EcrCredentials),
        ("us-central1-docker.pkg.dev/proj/repo", None, None, GoogleCredentials),
        ("gcr.io", None, "  ", GoogleCredentials),
        ("eu.gcr.io/proj", "oauth2accesstoken", "ya29.given-token", StaticCredentials),
    ],
)
def test_make_provider_rules(
    registry: str, username: str | None, password: str | None, kind: type
) -> None:
    provider = make_provider(registry=registry, username=username, password=password)
    assert isinstance(provider, kind)
    assert isinstance(provider, CredentialProvider)
    if kind is StaticCredentials:
        assert provider.get() == Credentials(username=str(username), password=str(password))


@pytest.mark.parametrize("registry", ["ghcr.io", "registry.example.com:5000/team", "docker.io"])
def test_make_provider_requires_password_elsewhere(registry: str) -> None:
    with pytest.raises(ConfigError, match=r"^DOCKER_REGISTRY_PASSWORD is required for ") as info:
        make_provider(registry=registry, username="alice", password=None)
    assert registry.split("/")[0].split(":")[0] in str(info.value)


def test_make_provider_requires_username_with_password() -> None:
    with pytest.raises(ConfigError, match="DOCKER_USERNAME is required"):
        make_provider(registry="ghcr.io", username=None, password="s3cret")


def test_make_provider_rejects_ecr_endpoint_for_other_hosts() -> None:
    with pytest.raises(ConfigError, match="MLFLOW_DOCK_ECR_ENDPOINT_URL"):
        make_provider(
            registry="ghcr.io", username="a", password="b", ecr_endpoint_url="http://127.0.0.1:1"
        )


def test_json_key_is_validated_and_passed_as_is(json_key: str) -> None:
    provider = make_provider(registry=GAR_HOST, username="_json_key", password=json_key)
    assert provider.get() == Credentials(username="_json_key", password=json_key)


def test_json_key_base64_is_validated_and_line_breaks_dropped(json_key: str) -> None:
    encoded = base64.b64encode(json_key.encode()).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + "\n"
    provider = make_provider(registry="gcr.io", username="_json_key_base64", password=wrapped)
    assert provider.get() == Credentials(username="_json_key_base64", password=encoded)


MARKER = "VERY-SECRET-MARKER-9f8e7d"


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("_json_key", '{"private_key": "' + MARKER, r"not a JSON key file \(line 1 column"),
        ("_json_key", MARKER, "not a JSON key file"),
        ("_json_key", f'["{MARKER}"]', "not a JSON object"),
        (
            "_json_key",
            json.dumps({"type": "service_account", "private_key": MARKER}),
            r"missing client_email",
        ),
        (
            "_json_key",
            json.dumps({"type": "authorized_user", "client_email": "x", "private_key": MARKER}),
            "type is not service_account",
        ),
        ("_json_key_base64", f"{MARKER}!!", "not valid base64"),
        ("_json_key_base64", base64.b64encode(MARKER.encode()).decode(), "not a JSON key file"),
        ("_json_key_base64", base64.b64encode(b"\xff\xfe" + MARKER.encode()).decode(), "base64"),
    ],
)
def test_malformed_json_keys_fail_early_without_echoing_the_key(
    username: str, password: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        make_provider(registry=GAR_HOST, username=username, password=password)
    text = str(info.value)
    assert "\n" not in text
    assert MARKER not in text
    assert MARKER not in repr(info.value)
    assert text.startswith("DOCKER_REGISTRY_PASSWORD: ")
    # Chained exceptions (json's, binascii's) would carry the document: none is attached.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_credentials_repr_hides_password() -> None:
    creds = Credentials(username="alice", password=MARKER)
    for text in (repr(creds), str(creds), f"{creds}", f"{creds!r}"):
        assert MARKER not in text
        assert "alice" in text
    assert creds.auth_config() == {"username": "alice", "password": MARKER}
    provider = StaticCredentials(username="alice", password=MARKER)
    assert MARKER not in repr(provider)


# -- Amazon ECR against moto ------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # No real config, and never the instance-metadata service at 169.254.169.254.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def moto(moto_url: str, aws_env: None) -> str:
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=10
    ).close()
    return moto_url


class CountingClients:
    """Real boto3 ECR clients that count the API calls they send (botocore's event hooks)."""

    def __init__(self, endpoint_url: str, *, delay: float = 0.0) -> None:
        self.endpoint_url = endpoint_url
        self.delay = delay
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def client(self) -> Any:
        client = boto3.client("ecr", region_name=REGION, endpoint_url=self.endpoint_url)
        client.meta.events.register("before-call.ecr.*", self._count)
        return client

    def _count(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.calls.append(model.name)
        if self.delay:
            time.sleep(self.delay)

    def count(self, operation: str) -> int:
        return self.calls.count(operation)


def test_ecr_token_fetch_and_decode(moto: str) -> None:
    provider = EcrCredentials(registry_host=ECR_HOST, endpoint_url=moto)
    creds = provider.get()
    assert creds == Credentials(username="AWS", password=MOTO_PASSWORD)
    assert MOTO_PASSWORD not in repr(provider)
    assert creds.auth_config() == {"username": "AWS", "password": MOTO_PASSWORD}


def test_ecr_token_cached_until_near_expiry(moto: str) -> None:
    clients = CountingClients(moto)
    clock = FakeClock(MOTO_EXPIRES_AT - 12 * 3600)
    provider = EcrCredentials(
        registry_host=ECR_HOST, client_factory=clients.client, clock=clock, refresh_margin=900
    )
    first = provider.get()
    clock.now = MOTO_EXPIRES_AT - 16 * 60
    assert provider.get() is first
    assert clients.count("GetAuthorizationToken") == 1

    clock.now = MOTO_EXPIRES_AT - 14 * 60  # inside the 15-minute margin
    assert provider.get() == first  # moto always issues the same token
    assert clients.count("GetAuthorizationToken") == 2

    clock.now = MOTO_EXPIRES_AT - 3600  # the refreshed entry is cached again
    provider.get()
    assert clients.count("GetAuthorizationToken") == 2

    provider.invalidate()
    provider.get()
    assert clients.count("GetAuthorizationToken") == 3


def test_ecr_expired_token_is_used_but_not_cached(moto: str) -> None:
    # With the real clock moto's 2015 expiry is long past: no cache, but still a working token.
    clients = CountingClients(moto)
    provider = EcrCredentials(registry_host=ECR_HOST, client_factory=clients.client)
    assert provider.get().password == MOTO_PASSWORD
    assert provider.get().password == MOTO_PASSWORD
    assert clients.count("GetAuthorizationToken") == 2


def test_ecr_concurrent_gets_fetch_once(moto: str) -> None:
    clients = CountingClients(moto, delay=0.3)
    provider = EcrCredentials(
        registry_host=ECR_HOST,
        client_factory=clients.client,
        clock=FakeClock(MOTO_EXPIRES_AT - 3600),
    )
    results: list[Credentials] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(provider.get())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 8
    assert {r.password for r in results} == {MOTO_PASSWORD}
    assert clients.count("GetAuthorizationToken") == 1


def test_ecr_ensure_repository_creates_once_and_is_idempotent(moto: str) -> None:
    clients = CountingClients(moto)
    provider = EcrCredentials(registry_host=ECR_HOST, client_factory=clients.client)
    admin = EcrRepositories(provider)
    observer = boto3.client("ecr", region_name=REGION, endpoint_url=moto)

    admin.ensure_repository("team/iris-classifier")
    repos = observer.describe_repositories()["repositories"]
    assert [r["repositoryName"] for r in repos] == ["team/iris-classifier"]
    assert repos[0]["imageTagMutability"] == "MUTABLE"
    assert clients.count("CreateRepository") == 1

    admin.ensure_repository("team/iris-classifier")
    admin.ensure_repository(f"{ECR_HOST}/team/iris-classifier")  # full name, same repo
    assert clients.count("CreateRepository") == 1
    assert clients.count("DescribeRepositories") == 1  # remembered after the first call

    # A second worker (new provider) finds it and does not create it again.
    other_clients = CountingClients(moto)
    EcrRepositories(
        EcrCredentials(registry_host=ECR_HOST, client_factory=other_clients.client)
    ).ensure_repository("team/iris-classifier")
    assert other_clients.calls == ["DescribeRepositories"]
    assert len(observer.describe_repositories()["repositories"]) == 1


def test_ecr_ensure_repository_tolerates_a_concurrent_create(moto: str) -> None:
    observer = boto3.client("ecr", region_name=REGION, endpoint_url=moto)

    def client() -> Any:
        ecr = boto3.client("ecr", region_name=REGION, endpoint_url=moto)

        # Someone else creates the repository between our Describe and our Create.
        def race(**_: Any) -> None:
            observer.create_repository(repositoryName="raced")

        ecr.meta.events.register("before-call.ecr.CreateRepository", race)
        return ecr

    EcrRepositories(
        EcrCredentials(registry_host=ECR_HOST, client_factory=client)
    ).ensure_repository("raced")
    names = [r["repositoryName"] for r in observer.describe_repositories()["repositories"]]
    assert names == ["raced"]


def test_ecr_invalid_repository_name_is_permanent(moto: str) -> None:
    provider = EcrCredentials(registry_host=ECR_HOST, endpoint_url=moto)
    admin = EcrRepositories(provider)
    with pytest.raises(PermanentError, match=ECR_HOST):
        admin.ensure_repository("Not_Valid//Name")


def test_ecr_unreachable_endpoint_is_retryable(aws_env: None) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    provider = EcrCredentials(registry_host=ECR_HOST, endpoint_url=url)
    admin = EcrRepositories(provider)
    with pytest.raises(RetryableError) as info:
        provider.get()
    message = str(info.value)
    assert ECR_HOST in message
    assert "cannot reach the AWS API" in message
    assert "\n" not in message
    with pytest.raises(RetryableError):
        admin.ensure_repository("model-x")


def test_ecr_without_aws_credentials_is_permanent(
    moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    provider = EcrCredentials(registry_host=ECR_HOST, endpoint_url=moto)
    with pytest.raises(PermanentError, match=rf"{ECR_HOST}: no usable AWS credentials"):
        provider.get()


def test_ecr_fips_host_with_custom_endpoint_works(moto: str) -> None:
    # botocore refuses FIPS plus a custom endpoint; the provider must not ask for both.
    provider = EcrCredentials(
        registry_host=f"{ACCOUNT}.dkr.ecr-fips.us-east-1.amazonaws.com", endpoint_url=moto
    )
    assert provider.get().username == "AWS"


def _client_error(code: str, status: int, message: str = "details") -> Exception:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetAuthorizationToken",
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_client_error("AccessDeniedException", 400), PermanentError),
        (_client_error("UnrecognizedClientException", 400), PermanentError),
        (_client_error("ExpiredTokenException", 400), PermanentError),
        (_client_error("InvalidSignatureException", 403), PermanentError),
        (_client_error("ThrottlingException", 400), RetryableError),
        (_client_error("TooManyRequestsException", 429), RetryableError),
        (_client_error("ServerException", 500), RetryableError),
        (_client_error("SomethingNew", 503), RetryableError),
        (_client_error("LimitExceededException", 400), PermanentError),
        (botocore.exceptions.NoCredentialsError(), PermanentError),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="https://x"), RetryableError),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="https://x"), RetryableError),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="https://x"), RetryableError),
        (ValueError("a bug"), PermanentError),
    ],
)
def test_translate_aws_error(exc: Exception, kind: type) -> None:
    error = translate_aws_error(exc, registry=ECR_HOST, action="getting a token")
    assert type(error) is kind
    assert str(error).startswith(f"getting a token for {ECR_HOST}: ")
    assert "\n" not in str(error)


# -- Google against a local OAuth2 token endpoint ---------------------------------------------


def _b64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


class TokenEndpoint:
    """A minimal OAuth2 token endpoint for the JWT-bearer grant (RFC 7523), as Google runs."""

    def __init__(self, public_key: rsa.RSAPublicKey, client_email: str) -> None:
        self.public_key = public_key
        self.client_email = client_email
        self.mode = "ok"
        self.grants: list[dict[str, Any]] = []
        self.attempts = 0
        self.issued = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                status, body = endpoint.answer(self.path, self.headers, form)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, headers: Any, form: dict[str, list[str]]) -> tuple[int, Any]:
        with self._lock:
            self.attempts += 1
            if path != "/token":
                return 404, {"error": "not_found"}
            if self.mode == "500":
                return 500, {"error": "internal_failure", "error_description": "backend down"}
            if headers.get("Content-Type") != "application/x-www-form-urlencoded":
                return 400, {"error": "invalid_request"}
            if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
                return 400, {"error": "unsupported_grant_type"}
            claims = self._verify(form.get("assertion", [""])[0])
            if claims is None or self.mode == "invalid_grant":
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Invalid JWT Signature.",
                }
            self.grants.append(claims)
            self.issued += 1
            return 200, {
                "access_token": f"ya29.test-token-{self.issued}",
                "expires_in": 3600,
                "token_type": "Bearer",
            }

    def _verify(self, assertion: str) -> dict[str, Any] | None:
        try:
            header_b64, payload_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url(header_b64))
            claims = json.loads(_b64url(payload_b64))
            if header.get("alg") != "RS256":
                return None
            self.public_key.verify(
                _b64url(signature_b64),
                f"{header_b64}.{payload_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, InvalidSignature):
            return None
        now = time.time()
        # google-auth always addresses the grant to Google's token endpoint, whatever the key
        # file's token_uri says; Google's endpoint checks exactly that audience.
        if claims.get("iss") != self.client_email or claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return None
        if not (claims["iat"] - 60 <= now <= claims["exp"] + 60):
            return None
        return dict(claims)


@pytest.fixture(scope="module")
def google_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, TokenEndpoint]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = _service_account_info()
    info["private_key"] = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    endpoint = TokenEndpoint(key.public_key(), info["client_email"])
    info["token_uri"] = endpoint.url
    path = tmp_path_factory.mktemp("gcp") / "key.json"
    path.write_text(json.dumps(info))
    try:
        yield path, endpoint
    finally:
        endpoint.close()


@pytest.fixture
def google_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never gcloud's own ADC file, and never the metadata server at 169.254.169.254.
    from google.auth.compute_engine import _metadata

    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    # google-auth reads NO_GCE_CHECK and GCE_METADATA_HOST once, when _metadata is first
    # imported (maybe by another test), so its module setting is pinned too. GCE_METADATA_IP is
    # read per call: a closed loopback port is the backstop.
    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)
    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)


@pytest.fixture
def token_endpoint(
    google_key: tuple[Path, TokenEndpoint], google_env: None, monkeypatch: pytest.MonkeyPatch
) -> TokenEndpoint:
    path, endpoint = google_key
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    endpoint.mode = "ok"
    endpoint.grants.clear()
    endpoint.attempts = 0
    return endpoint


def test_google_token_fetch_through_adc(token_endpoint: TokenEndpoint) -> None:
    provider = make_provider(registry=f"{GAR_HOST}/proj/repo", username=None, password=None)
    assert isinstance(provider, GoogleCredentials)
    creds = provider.get()
    assert creds.username == "oauth2accesstoken"
    assert creds.password.startswith("ya29.test-token-")
    assert creds.password not in repr(provider)
    assert creds.password not in repr(creds)
    [claims] = token_endpoint.grants
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert claims["iss"] == "pusher@test-project.iam.gserviceaccount.com"


def test_google_token_cached_and_refreshed_near_expiry(token_endpoint: TokenEndpoint) -> None:
    start = time.time()
    clock = FakeClock(start)
    provider = GoogleCredentials(registry_host=GAR_HOST, clock=clock, refresh_margin=300)
    first = provider.get()
    clock.now = start + 3600 - 300 - 30  # the token has 5.5 minutes left: still cached
    assert provider.get() is first
    assert len(token_endpoint.grants) == 1

    clock.now = start + 3600 - 300 + 30  # inside the 5-minute margin: a new token
    second = provider.get()
    assert second.password != first.password
    assert len(token_endpoint.grants) == 2
    # The new token's hour runs from the real now, so back at the real clock it is cached.
    clock.now = time.time()
    assert provider.get() is second
    assert len(token_endpoint.grants) == 2


def test_google_concurrent_gets_refresh_once(token_endpoint: TokenEndpoint) -> None:
    provider = GoogleCredentials(registry_host=GAR_HOST)
    barrier = threading.Barrier(6)
    results: list[Credentials] = []

    def worker() -> None:
        barrier.wait()
        results.append(provider.get())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len({r.password for r in results}) == 1
    assert len(results) == 6
    assert len(token_endpoint.grants) == 1


def test_google_endpoint_500_is_retryable(token_endpoint: TokenEndpoint) -> None:
    token_endpoint.mode = "500"
    provider = GoogleCredentials(registry_host=GAR_HOST)
    with pytest.raises(RetryableError) as info:
        provider.get()
    message = str(info.value)
    assert message.startswith(f"getting a Google access token for {GAR_HOST}: ")
    assert "\n" not in message
    # google-auth retried it itself before giving up; we add no retries on top.
    assert token_endpoint.attempts == 3
    # The provider recovers once the endpoint does.
    token_endpoint.mode = "ok"
    assert provider.get().username == "oauth2accesstoken"


def test_google_outage_inside_the_margin_serves_the_current_token(
    token_endpoint: TokenEndpoint,
) -> None:
    start = time.time()
    clock = FakeClock(start)
    provider = GoogleCredentials(registry_host=GAR_HOST, clock=clock, refresh_margin=300)
    first = provider.get()
    token_endpoint.mode = "500"
    clock.now = start + 3600 - 200  # due for refresh, but still valid for 200 s
    assert provider.get() is first
    assert token_endpoint.attempts == 1 + 3
    clock.now += 10  # within the retry interval: no new attempt
    assert provider.get() is first
    assert token_endpoint.attempts == 4

    token_endpoint.mode = "ok"
    clock.now += 30  # retry interval over: refreshed
    second = provider.get()
    assert second.password != first.password
    assert token_endpoint.attempts == 5


def test_google_outage_near_expiry_is_retryable(token_endpoint: TokenEndpoint) -> None:
    start = time.time()
    clock = FakeClock(start)
    provider = GoogleCredentials(registry_host=GAR_HOST, clock=clock)
    provider.get()
    token_endpoint.mode = "500"
    clock.now = start + 3600 - 30  # too close to expiry to push with
    with pytest.raises(RetryableError, match="Google token endpoint unavailable"):
        provider.get()


def test_google_invalid_grant_is_permanent(token_endpoint: TokenEndpoint) -> None:
    token_endpoint.mode = "invalid_grant"
    provider = GoogleCredentials(registry_host=GAR_HOST)
    with pytest.raises(PermanentError, match="invalid_grant") as info:
        provider.get()
    message = str(info.value)
    assert GAR_HOST in message
    assert "\n" not in message
    assert token_endpoint.attempts == 1


def test_google_unreachable_token_endpoint_is_retryable(
    google_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    info = _service_account_info(token_uri=f"http://127.0.0.1:{free_port()}/token")
    path = tmp_path / "key.json"
    path.write_text(json.dumps(info))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    with pytest.raises(RetryableError, match="cannot reach the Google token endpoint"):
        GoogleCredentials(registry_host=GAR_HOST).get()


def test_google_missing_adc_file_is_permanent(
    google_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(PermanentError, match="no usable Google application default credentials"):
        GoogleCredentials(registry_host="gcr.io").get()


def test_google_no_adc_anywhere_is_permanent(
    google_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(PermanentError, match=rf"for {GAR_HOST}: no usable Google"):
        GoogleCredentials(registry_host=GAR_HOST).get()


def test_ecr_delete_tag_keeps_the_image_for_other_tags(moto: str) -> None:
    """ECR's BatchDeleteImage by tag, against moto's server: the other tag survives."""
    provider = EcrCredentials(registry_host=ECR_HOST, endpoint_url=moto)
    admin = EcrRepositories(provider)
    admin.ensure_repository("team/iris")
    client = boto3.client("ecr", region_name=REGION, endpoint_url=moto)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 2,
                "digest": "sha256:" + "1" * 64,
            },
            "layers": [],
        }
    )
    for tag in ("3", "champion"):
        client.put_image(repositoryName="team/iris", imageManifest=manifest, imageTag=tag)

    assert admin.delete_tag("team/iris", "champion") is True
    assert admin.delete_tag("team/iris", "champion") is True  # already gone: fine
    images = client.describe_images(repositoryName="team/iris")["imageDetails"]
    assert [sorted(i.get("imageTags", [])) for i in images] == [["3"]]
