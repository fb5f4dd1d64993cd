"""Tests for mlflow_dock.cloud.ecr against moto in server mode, reached by real boto3 clients
over HTTP. Nothing here leaves 127.0.0.1: the AWS instance-metadata lookup is switched off in the
environment.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

from mlflow_dock.cloud.credentials import Credentials
from mlflow_dock.cloud.ecr import (
    EcrCredentials,
    EcrRepositories,
    is_ecr_host,
    parse_ecr_host,
    translate_aws_error,
)
from mlflow_dock.errors import ConfigError, PermanentError, RetryableError
from support.cloud import ACCOUNT, ECR_HOST, REGION, FakeClock, free_port

MOTO_PASSWORD = f"{ACCOUNT}-auth-token"  # what moto issues for its default account
# moto stamps every token with this expiry, so tests pin the clock relative to it.
MOTO_EXPIRES_AT = datetime(2015, 1, 1, tzinfo=UTC).timestamp()


# -- hosts ------------------------------------------------------------------------------------


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


def test_ecr_tokens_are_refreshable() -> None:
    # A revoked or early-expired token is worth replacing: the registry client and the engine
    # push ask for a new one once.
    assert EcrCredentials(registry_host=ECR_HOST).refreshable is True
