"""Tests for mlflow_dock.cloud.providers: which provider (and whether ECR's own API) the registry
settings choose, and the checks made before anything is fetched."""

from __future__ import annotations

import base64
import json

import pytest

from mlflow_dock.cloud.credentials import CredentialProvider, Credentials
from mlflow_dock.cloud.ecr import EcrCredentials
from mlflow_dock.cloud.google import GoogleCredentials
from mlflow_dock.cloud.providers import layer_size_limit, make_provider, registry_access
from mlflow_dock.cloud.static import StaticCredentials
from mlflow_dock.errors import ConfigError
from support.cloud import ECR_HOST, GAR_HOST, MARKER, service_account_info


@pytest.fixture(scope="module")
def json_key() -> str:
    return json.dumps(service_account_info(), indent=2)


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


@pytest.mark.parametrize(
    ("registry", "password", "create", "ecr_api"),
    [
        (ECR_HOST, None, False, True),  # the AWS identity issues the tokens: its API is ours
        (ECR_HOST, "pre-fetched-token", False, False),  # a password alone: no AWS API at all
        (ECR_HOST, "pre-fetched-token", True, True),  # asked to create repositories
        (GAR_HOST, None, False, False),
        ("ghcr.io", "s3cret", False, False),
    ],
)
def test_ecr_api_only_where_the_aws_identity_is_ours_to_use(
    registry: str, password: str | None, create: bool, ecr_api: bool
) -> None:
    access = registry_access(
        registry=registry, username="AWS", password=password, ecr_create_repositories=create
    )
    assert (access.ecr is not None) is ecr_api


def test_only_cloud_tokens_are_refreshable() -> None:
    def provider(registry: str, password: str | None) -> CredentialProvider:
        return make_provider(registry=registry, username="AWS", password=password)

    assert provider(ECR_HOST, None).refreshable is True
    assert provider(GAR_HOST, None).refreshable is True
    assert provider(ECR_HOST, "pre-fetched-token").refreshable is False


@pytest.mark.parametrize(
    ("registry", "limit"),
    [
        ("ghcr.io/acme", 10 * 10**9),
        (ECR_HOST, 52_000 << 20),
        (f"{ECR_HOST}/team", 52_000 << 20),
        ("docker.io", None),
        ("us-central1-docker.pkg.dev/proj/repo", None),
        ("127.0.0.1:5000", None),
    ],
)
def test_known_layer_size_limits(registry: str, limit: int | None) -> None:
    assert layer_size_limit(registry) == limit
