"""A model's name and aliases never reach what the service itself writes (SECURITY.md).

Against the real parts: a model registered as ``mlflow-dock-base`` (the repository that holds
the derived bases every lightgbm/xgboost image is built on) with an alias ``os-<40 hex>`` (the
form of a derived base's tag), and an alias ``sha256-<the image digest's hex>`` (the OCI 1.1
referrers fallback tag that holds the image's SBOM, signature and provenance). Before names
were reserved, the version and the first alias landed in the derived bases' repository and the
second moved the fallback tag onto the image itself.
"""

from __future__ import annotations

import hashlib
import json

from mlflow import MlflowClient
from mlflow_dock.oci import reference as naming
from mlflow_dock.oci.manifest import OCI_INDEX
from mlflow_dock.oci.remote import RegistryClient
from support import web
from support.jobs import alias_of, build_of, job_detail, wait_for_job
from support.servers import RegistryServer, log_sklearn_model

SERVICE_REPOSITORY = "mlflow-dock-base"


def tags_of(registry: RegistryServer, repository: str) -> list[str]:
    response = web.get(f"{registry.url}/v2/{repository}/tags/list", auth=registry.auth, timeout=10)
    if response.status_code == 404:  # no such repository: nothing was ever pushed there
        return []
    response.raise_for_status()
    return list(response.json().get("tags") or [])


def test_a_model_named_like_a_service_repository_cannot_write_there_or_move_attachments(
    service_factory, webhook_factory, mlflow_server, registry: RegistryServer
) -> None:
    service = service_factory(MLFLOW_DOCK_SMOKE_TEST="false")
    webhook_factory(
        f"{service.url}/webhook",
        service_factory.secret,
        events=("model_version.created", "model_version_alias.created"),
    )
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    # One registered model of this name per MLflow server: one test only uses it.
    version = log_sklearn_model(mlflow_server.url, SERVICE_REPOSITORY)
    before = tags_of(registry, SERVICE_REPOSITORY)

    build = wait_for_job(service, build_of(SERVICE_REPOSITORY, version), timeout=600)
    assert build["state"] == "succeeded", job_detail(service, build["id"])["log_tail"][-20:]
    hashed = naming.repository_name(SERVICE_REPOSITORY)
    assert hashed.startswith(f"{SERVICE_REPOSITORY}-") and hashed != SERVICE_REPOSITORY
    assert build["image"] == f"{registry.host}/{hashed}:{version}"

    derived_like = "os-" + hashlib.sha256(b"any base and packages").hexdigest()[:40]
    digest_hex = build["digest"].removeprefix("sha256:")
    fallback_tag = f"sha256-{digest_hex}"
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as api:
        fallback_before = api.manifest_digest(hashed, fallback_tag)
        for alias in (derived_like, fallback_tag):
            client.set_registered_model_alias(SERVICE_REPOSITORY, alias, version)
            job = wait_for_job(service, alias_of(SERVICE_REPOSITORY, alias), timeout=120)
            assert job["state"] == "succeeded", job
            tag = naming.alias_tag(alias)
            assert job["image"] == f"{registry.host}/{hashed}:{tag}"
            assert api.manifest_digest(hashed, tag) == build["digest"]
        # The referrers fallback of the image is still the index of its attachments (the
        # SBOM is always attached), not the image the alias points at.
        fallback_after = api.manifest_digest(hashed, fallback_tag)
        assert fallback_after is not None and fallback_after == fallback_before
        assert fallback_after != build["digest"]
        index = api.get_manifest(hashed, fallback_tag)
        assert index.media_type == OCI_INDEX
        assert json.loads(index.body)["manifests"], "the attachments are still listed"

    # Nothing of this model reached the service's own repository (tests on this xdist worker
    # run one at a time, and other workers have registries of their own).
    assert tags_of(registry, SERVICE_REPOSITORY) == before
