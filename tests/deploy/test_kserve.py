"""deploy/kserve: InferenceServices that run mlflow-dock images over the Open Inference Protocol.

No cluster is available here, and these manifests have never been applied to one. They are
checked offline, twice: the whole resource against the KServe SDK's InferenceService types
(generated from KServe's Go API, the source of its CRD schema), walked strictly so an unknown
or misspelt field fails; and the predictor's pod parts as a Pod against the Kubernetes OpenAPI
schemas that `kubernetes-validate` bundles. Then their wiring is checked against the server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mlflow_dock.imaging.dockerfile import RUNTIME_UID, SERVING_PORT
from mlflow_dock.oci.reference import modelcar_tag
from mlflow_dock.serving.server.config import MODEL_NAME_ENV, MODEL_PATH_ENV, MODEL_VERSION_ENV

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kserve"
SCHEMA_VERSIONS = ("1.29.0", "1.37.0")
BAKED = "inferenceservice.yaml"
MODELCAR = "inferenceservice-modelcar.yaml"

_LIST = re.compile(r"^[Ll]ist\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")


def _model_class(type_name: str) -> type:
    import kserve.models
    import kubernetes.client

    for module in (kserve.models, kubernetes.client):
        found = getattr(module, type_name, None)
        if isinstance(found, type) and hasattr(found, "openapi_types"):
            return found
    raise AssertionError(f"no API type {type_name}")


def schema_errors(value: Any, type_name: str, path: str = "") -> list[str]:
    """Every field of `value` that the API type `type_name` does not have, or mistypes."""
    if match := _LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, match[1], f"{path}[{i}]")]
    if match := _DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        inner = match[1] or match[2]
        return [e for k, v in value.items() for e in schema_errors(v, inner, f"{path}.{k}")]
    scalar = {"str": str, "bool": bool, "int": int, "float": (int, float)}
    if type_name in scalar:
        ok = isinstance(value, scalar[type_name]) and not (
            type_name == "int" and isinstance(value, bool)
        )
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name in ("object", "ResourceQuantity", "datetime"):
        return []  # int-or-string ports, quantities, free-form
    cls = _model_class(type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors.extend(schema_errors(item, cls.openapi_types[fields[key]], f"{path}.{key}"))
    return errors


def load(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    return doc


def as_pod(service: dict[str, Any]) -> dict[str, Any]:
    """The predictor's pod fields as a Pod, for the Kubernetes schemas."""
    predictor = service["spec"]["predictor"]
    pod_fields = ("containers", "volumes", "securityContext", "serviceAccountName")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": service["metadata"]["name"]},
        "spec": {k: predictor[k] for k in pod_fields if k in predictor},
    }


def container(service: dict[str, Any]) -> dict[str, Any]:
    (only,) = service["spec"]["predictor"]["containers"]
    return only


def env(service: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(service).get("env", [])}


@pytest.fixture(params=[BAKED, MODELCAR])
def service(request):
    return load(request.param)


def test_the_directory_holds_the_two_inference_services():
    assert {p.name for p in MANIFESTS.glob("*.yaml")} == {BAKED, MODELCAR}
    for name in (BAKED, MODELCAR):
        doc = load(name)
        assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")


def test_each_is_a_valid_inference_service(service):
    assert schema_errors(service, "V1beta1InferenceService") == []


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_each_predictor_pod_is_valid_kubernetes(service, version):
    kubernetes_validate.validate(as_pod(service), version, strict=True)


@pytest.mark.parametrize(
    ("where", "misspelt"),
    [
        (lambda s: s["spec"]["predictor"], "minReplica"),
        (lambda s: s["spec"], "predicter"),
        (container, "readinesProbe"),
        (lambda s: container(s)["securityContext"], "runAsNonRot"),
    ],
)
def test_a_misspelt_field_is_refused(where, misspelt):
    """The checks above have teeth: an unknown field anywhere in the resource fails."""
    doc = load(BAKED)
    where(doc)[misspelt] = True
    errors = schema_errors(doc, "V1beta1InferenceService")
    assert len(errors) == 1 and misspelt in errors[0]


def test_a_misspelt_pod_field_is_refused_by_the_kubernetes_schema_too():
    pod = as_pod(load(BAKED))
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(pod, SCHEMA_VERSIONS[-1], strict=True)


def test_a_mistyped_field_is_refused():
    doc = load(BAKED)
    doc["spec"]["predictor"]["minReplicas"] = "one"
    assert schema_errors(doc, "V1beta1InferenceService") == [
        ".spec.predictor.minReplicas: expected int, got 'one'"
    ]


def test_served_over_v2_on_the_image_port_with_v2_probes(service):
    server = container(service)
    assert server["name"] == "kserve-container"  # KServe's name for a custom predictor
    assert env(service)["PROTOCOL"] == "v2"
    assert [p["containerPort"] for p in server["ports"]] == [SERVING_PORT]
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_runs_locked_down_with_resources(service):
    pod_security = service["spec"]["predictor"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(service)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    resources = container(service)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    mounts = {m["mountPath"] for m in container(service)["volumeMounts"]}
    assert "/tmp" in mounts  # the one writable place on a read-only root


def test_the_baked_image_runs_as_its_own_user():
    pod_security = load(BAKED)["spec"]["predictor"]["securityContext"]
    assert pod_security["runAsUser"] == pod_security["runAsGroup"] == RUNTIME_UID


def test_the_modelcar_service_reads_the_model_kserve_mounts():
    doc = load(MODELCAR)
    variables = env(doc)
    uri = variables["STORAGE_URI"]
    assert uri.startswith("oci://") and uri.endswith("-modelcar")
    # MLflow's own variable, which its scoring app and the V2 routes both read.
    assert variables[MODEL_PATH_ENV] == "/mnt/models"
    assert variables[MODEL_NAME_ENV] == "iris-classifier"
    # The tag scheme mlflow-dock publishes Modelcars under (imaging/modelcar.py).
    assert uri.rsplit(":", 1)[1] == modelcar_tag(variables[MODEL_VERSION_ENV])
    # KServe sets one UID for the server and the modelcar sidecar: none is fixed here.
    assert "runAsUser" not in doc["spec"]["predictor"]["securityContext"]


def test_both_say_they_were_never_applied_to_a_cluster():
    for name in (BAKED, MODELCAR):
        assert "NOT APPLIED TO A CLUSTER" in (MANIFESTS / name).read_text()
