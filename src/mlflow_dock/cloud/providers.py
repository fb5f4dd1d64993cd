"""Choosing the credential provider (and ECR's own API) from the registry settings.

The one place that knows which provider serves which registry: `app.py` calls
`registry_access` once and hands the parts on, so nothing downstream asks which provider it
holds (`CredentialProvider.refreshable` says what callers need to know).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from mlflow_dock.cloud.credentials import CredentialProvider
from mlflow_dock.cloud.ecr import ECR_USERNAME, EcrCredentials, EcrRepositories, is_ecr_host
from mlflow_dock.cloud.google import (
    GOOGLE_JSON_KEY_BASE64_USERNAME,
    GOOGLE_JSON_KEY_USERNAME,
    GOOGLE_TOKEN_USERNAME,
    GoogleCredentials,
    is_google_host,
    validated_json_key,
)
from mlflow_dock.cloud.static import StaticCredentials
from mlflow_dock.errors import ConfigError
from mlflow_dock.oci.reference import registry_hostname

__all__ = ["RegistryAccess", "layer_size_limit", "make_provider", "registry_access"]

# The largest layer blob a registry accepts, where it says so: GHCR documents 10 GB per layer,
# ECR a 52,000 MiB layer quota.
_GHCR_LAYER_LIMIT = 10 * 10**9
_ECR_LAYER_LIMIT = 52_000 << 20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryAccess:
    """What the configured registry needs from its cloud.

    `ecr` is ECR's own API (repository creation, tag deletion) where the registry is ECR and
    the AWS identity is ours to use: it issues the tokens (no password configured), or
    MLFLOW_DOCK_ECR_CREATE_REPOSITORIES asks for repositories. A configured password alone (e.g.
    from `aws ecr get-login-password`) never touches the AWS API.
    """

    credentials: CredentialProvider
    ecr: EcrRepositories | None = None


def registry_access(
    *,
    registry: str,
    username: str | None,
    password: str | None,
    ecr_endpoint_url: str | None = None,
    ecr_create_repositories: bool = False,
    on_token: Callable[[str], None] = lambda _token: None,
) -> RegistryAccess:
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
            password = validated_json_key(username, password)
        static = StaticCredentials(username=username, password=password)
        if not ecr_create_repositories:
            return RegistryAccess(static)
        # The password pushes; creating repositories still takes the ambient AWS identity.
        identity = EcrCredentials(registry_host=host, endpoint_url=ecr_endpoint_url)
        return RegistryAccess(static, EcrRepositories(identity))
    if is_ecr_host(host):
        _note_ignored_username(username, ECR_USERNAME, host)
        ecr = EcrCredentials(registry_host=host, endpoint_url=ecr_endpoint_url, on_token=on_token)
        # One boto3 client for the tokens and for ECR's own API.
        return RegistryAccess(ecr, EcrRepositories(ecr))
    if is_google_host(host):
        _note_ignored_username(username, GOOGLE_TOKEN_USERNAME, host)
        return RegistryAccess(GoogleCredentials(registry_host=host, on_token=on_token))
    raise ConfigError(
        f"DOCKER_REGISTRY_PASSWORD is required for {host} (only Amazon ECR and Google "
        "Artifact Registry / Container Registry hosts can use cloud credentials instead)"
    )


def make_provider(
    *,
    registry: str,
    username: str | None,
    password: str | None,
    ecr_endpoint_url: str | None = None,
    ecr_create_repositories: bool = False,
    on_token: Callable[[str], None] = lambda _token: None,
) -> CredentialProvider:
    """Only the credential provider of `registry_access` (same arguments, same checks)."""
    return registry_access(
        registry=registry,
        username=username,
        password=password,
        ecr_endpoint_url=ecr_endpoint_url,
        ecr_create_repositories=ecr_create_repositories,
        on_token=on_token,
    ).credentials


def _note_ignored_username(username: str | None, used: str, host: str) -> None:
    if username and username != used:
        logger.warning(
            "DOCKER_USERNAME %r is ignored for %s: without DOCKER_REGISTRY_PASSWORD the "
            "cloud credentials log in as %r",
            username,
            host,
            used,
        )


def layer_size_limit(registry: str) -> int | None:
    """The layer size limit (bytes) of a registry known to have one; None: none known."""
    host = registry_hostname(registry)
    if host == "ghcr.io":
        return _GHCR_LAYER_LIMIT
    if is_ecr_host(host):
        return _ECR_LAYER_LIMIT
    return None
