"""SLSA v1 provenance: an in-toto Statement v1 about the image, signed in a DSSE envelope.

Formats (in-toto attestation framework, SLSA v1.0, DSSE v1):
- Statement: ``_type`` https://in-toto.io/Statement/v1, ``subject`` [{name, digest{sha256}}],
  ``predicateType`` https://slsa.dev/provenance/v1, ``predicate`` {buildDefinition, runDetails};
- DSSE envelope: {payloadType, payload (base64), signatures [{keyid, sig (base64)}]}, where the
  signature is over PAE(payloadType, payload) =
  ``"DSSEv1" SP len(type) SP type SP len(body) SP body`` (lengths as ASCII decimals).
cosign stores such an envelope as a layer of ``application/vnd.dsse.envelope.v1+json`` under the
``.att`` tag, with the predicate type as a layer annotation; `cosign verify-attestation` reads it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mlflow_dock.supply.signing import Signer

__all__ = [
    "DSSE_MEDIA_TYPE",
    "IN_TOTO_PAYLOAD_TYPE",
    "SLSA_PREDICATE_TYPE",
    "BuildFacts",
    "dsse_envelope",
    "pae",
    "statement",
]

STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
SLSA_PREDICATE_TYPE: Final = "https://slsa.dev/provenance/v1"
IN_TOTO_PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
DSSE_MEDIA_TYPE: Final = "application/vnd.dsse.envelope.v1+json"
BUILD_TYPE: Final = "https://github.com/mlflow-dock/mlflow-dock/build/v1"
BUILDER_ID: Final = "https://github.com/mlflow-dock/mlflow-dock"


@dataclass(frozen=True, kw_only=True)
class BuildFacts:
    """What one published version's image was made from; everything here is known exactly."""

    model_name: str
    model_version: str
    run_id: str | None
    model_source: str | None
    requirements_sha256: str
    base_image: str
    base_image_digest: str | None
    builder: str  # "layered" | "mlflow"
    mlflow_dock_version: str
    job_id: str | None = None
    event: str | None = None  # "model_version.created" when a webhook delivery asked for it
    delivery_ids: Sequence[str] = ()
    tracking_uri: str | None = None
    started_on: str | None = None
    finished_on: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def statement(*, image_name: str, image_digest: str, facts: BuildFacts) -> dict[str, Any]:
    """The in-toto Statement v1 with a SLSA v1 provenance predicate for the image."""
    algorithm, _, hexdigest = image_digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        raise ValueError(f"image digest must be sha256:<64 hex>, not {image_digest!r}")
    external: dict[str, Any] = {
        "model": {
            "name": facts.model_name,
            "version": facts.model_version,
            "runId": facts.run_id,
            "source": facts.model_source,
        },
        "builder": facts.builder,
        "baseImage": facts.base_image,
    }
    if facts.event:
        external["event"] = facts.event
    if facts.delivery_ids:
        external["deliveryIds"] = list(facts.delivery_ids)
    dependencies: list[dict[str, Any]] = []
    if facts.base_image_digest:
        base_algo, _, base_hex = facts.base_image_digest.partition(":")
        dependencies.append({"uri": f"oci://{facts.base_image}", "digest": {base_algo: base_hex}})
    if facts.model_source:
        dependencies.append({"uri": facts.model_source, "name": "model"})
    dependencies.append(
        {"name": "requirements.txt", "digest": {"sha256": facts.requirements_sha256}}
    )
    metadata: dict[str, Any] = {}
    if facts.job_id:
        metadata["invocationId"] = facts.job_id
    if facts.started_on:
        metadata["startedOn"] = facts.started_on
    if facts.finished_on:
        metadata["finishedOn"] = facts.finished_on
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": image_name, "digest": {"sha256": hexdigest}}],
        "predicateType": SLSA_PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": dict(facts.extra),
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {
                    "id": BUILDER_ID,
                    "version": {"mlflow-dock": facts.mlflow_dock_version},
                },
                "metadata": metadata,
            },
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def dsse_envelope(
    payload: bytes, signer: Signer, *, payload_type: str = IN_TOTO_PAYLOAD_TYPE
) -> bytes:
    """A DSSE envelope over ``payload`` with one signature; keyid empty as cosign writes it."""
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": "", "sig": signer.sign_b64(pae(payload_type, payload))}],
    }
    return json.dumps(envelope, separators=(",", ":")).encode("utf-8")


def encode_statement(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")
