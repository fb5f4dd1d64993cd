"""deploy/kubernetes: every manifest is a valid resource with the wiring the README promises.

No cluster is available here: the manifests are checked structurally (below) and every one is
validated, offline, against the Kubernetes OpenAPI schemas bundled by `kubernetes-validate`
(strict: an unknown or misspelt field fails). They have never been applied to a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mlflow_dock.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes minor still commonly run (the manifests use nothing newer) and the newest
# schema kubernetes-validate bundles.
SCHEMA_VERSIONS = ("1.29.0", "1.37.0")
SECRET_KEYS = {
    "MLFLOW_WEBHOOK_SECRET",
    "DOCKER_REGISTRY_PASSWORD",
    "MLFLOW_DOCK_DATABASE_URL",
    "MLFLOW_DOCK_BROKER_URL",
}


def _resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d)
    return docs


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in _resources()}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _settings_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if alias is not None:
            names.update(c for c in alias.choices if isinstance(c, str))  # type: ignore[union-attr]
    return names


def test_every_listed_manifest_is_a_named_resource():
    docs = _resources()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
    listed = set(yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def test_api_has_two_replicas_probes_and_a_matching_service(resources):
    api = resources[("Deployment", "mlflow-dock-api")]
    assert api["spec"]["replicas"] == 2
    container = _container(api)
    assert container["args"] == ["serve"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = resources[("Service", "mlflow-dock")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    pdb = resources[("PodDisruptionBudget", "mlflow-dock-api")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_worker_runs_the_celery_worker(resources):
    worker = resources[("Deployment", "mlflow-dock-worker")]
    container = _container(worker)
    assert container["args"] == ["worker"]
    config = resources[("ConfigMap", "mlflow-dock")]["data"]
    assert config["MLFLOW_DOCK_EXECUTOR"] == "celery"


def test_no_pod_mounts_a_docker_socket_or_host_path(resources):
    for (kind, name), doc in resources.items():
        if kind != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        assert "docker.sock" not in yaml.safe_dump(doc), name
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        # The image's user (Dockerfile: USER 10001) and the volumes' group agree.
        assert spec["securityContext"]["runAsUser"] == 10001
        container = _container(doc)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/var/lib/mlflow-dock", "/tmp"} <= mounts


def test_secrets_live_in_the_secret_and_every_variable_is_a_setting(resources):
    secret = resources[("Secret", "mlflow-dock")]["stringData"]
    config = resources[("ConfigMap", "mlflow-dock")]["data"]
    assert set(secret) >= SECRET_KEYS
    assert not SECRET_KEYS & set(config)
    known = _settings_names()
    assert set(secret) | set(config) <= known, (set(secret) | set(config)) - known
    for doc in (
        resources[("Deployment", "mlflow-dock-api")],
        resources[("Deployment", "mlflow-dock-worker")],
    ):
        container = _container(doc)
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"mlflow-dock"}
        assert {e["name"] for e in container.get("env", [])} <= known


def _manifest_files() -> list[Path]:
    # kustomization.yaml configures kustomize; it is not an API resource and has no schema.
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_every_manifest_matches_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, path
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_misspelt_field(resources):
    """The check above has teeth: strict mode refuses a field Kubernetes does not know."""
    deployment = yaml.safe_load(yaml.safe_dump(resources[("Deployment", "mlflow-dock-api")]))
    container = _container(deployment)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[-1], strict=True)
