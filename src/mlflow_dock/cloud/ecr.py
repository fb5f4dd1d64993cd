"""Amazon ECR administration the OCI API cannot do: creating repositories, deleting one tag.

The token side of ECR (`EcrCredentials`) is a credential provider; this is what a job does with
the same boto3 client when ECR, unlike most registries, needs its own API.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow_dock.cloud.credentials import EcrCredentials, aws_error_code, translate_aws_error
from mlflow_dock.errors import PermanentError

__all__ = ["EcrRepositories"]

logger = logging.getLogger(__name__)


class EcrRepositories:
    """Repository creation and tag deletion for the registry of one `EcrCredentials`."""

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
