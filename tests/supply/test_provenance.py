"""Tests for mlflow_dock.supply.provenance: in-toto Statement v1, SLSA v1 predicate, DSSE."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from mlflow_dock.supply.provenance import (
    IN_TOTO_PAYLOAD_TYPE,
    SLSA_PREDICATE_TYPE,
    BuildFacts,
    dsse_envelope,
    encode_statement,
    pae,
    statement,
)
from mlflow_dock.supply.signing import Signer

DIGEST = "sha256:" + "cd" * 32
FACTS = BuildFacts(
    model_name="Iris Model",
    model_version="3",
    run_id="abc123",
    model_source="models:/m-1",
    requirements_sha256="ef" * 32,
    base_image="python:3.11-slim",
    base_image_digest="sha256:" + "12" * 32,
    builder="layered",
    mlflow_dock_version="0.1.0",
    job_id="job-1",
    event="model_version.created",
    delivery_ids=("delivery-1",),
)


def test_statement_names_the_image_and_the_build():
    doc = statement(image_name="reg/x/iris", image_digest=DIGEST, facts=FACTS)
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["subject"] == [{"name": "reg/x/iris", "digest": {"sha256": "cd" * 32}}]
    assert doc["predicateType"] == SLSA_PREDICATE_TYPE
    definition = doc["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["event"] == "model_version.created"
    assert definition["externalParameters"]["deliveryIds"] == ["delivery-1"]
    assert definition["externalParameters"]["model"] == {
        "name": "Iris Model",
        "version": "3",
        "runId": "abc123",
        "source": "models:/m-1",
    }
    deps = definition["resolvedDependencies"]
    assert {"uri": "oci://python:3.11-slim", "digest": {"sha256": "12" * 32}} in deps
    assert {"name": "requirements.txt", "digest": {"sha256": "ef" * 32}} in deps
    builder = doc["predicate"]["runDetails"]["builder"]
    assert builder["version"] == {"mlflow-dock": "0.1.0"}
    assert doc["predicate"]["runDetails"]["metadata"]["invocationId"] == "job-1"


def test_statement_without_event_or_base_digest_leaves_them_out():
    facts = BuildFacts(
        model_name="m",
        model_version="1",
        run_id=None,
        model_source=None,
        requirements_sha256="00" * 32,
        base_image="b",
        base_image_digest=None,
        builder="layered",
        mlflow_dock_version="0",
    )
    doc = statement(image_name="r/m", image_digest=DIGEST, facts=facts)
    external = doc["predicate"]["buildDefinition"]["externalParameters"]
    assert "event" not in external and "deliveryIds" not in external
    deps = doc["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert deps == [{"name": "requirements.txt", "digest": {"sha256": "00" * 32}}]


@pytest.mark.parametrize("digest", ["sha512:" + "a" * 128, "sha256:abc", "abc"])
def test_statement_refuses_other_digests(digest):
    with pytest.raises(ValueError):
        statement(image_name="r/m", image_digest=digest, facts=FACTS)


def test_pae_matches_the_dsse_spec_example():
    # The DSSE v1 protocol document's example: PAE("http://example.com/HelloWorld", "hello world")
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_envelope_signature_verifies_over_pae_and_fails_when_tampered():
    key = ec.generate_private_key(ec.SECP256R1())
    payload = encode_statement(statement(image_name="r/m", image_digest=DIGEST, facts=FACTS))
    envelope = json.loads(dsse_envelope(payload, Signer(key)))
    assert envelope["payloadType"] == IN_TOTO_PAYLOAD_TYPE
    body = base64.b64decode(envelope["payload"])
    assert json.loads(body)["subject"][0]["digest"]["sha256"] == "cd" * 32
    signature = base64.b64decode(envelope["signatures"][0]["sig"])
    key.public_key().verify(signature, pae(IN_TOTO_PAYLOAD_TYPE, body), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(
            signature, pae(IN_TOTO_PAYLOAD_TYPE, body + b" "), ec.ECDSA(hashes.SHA256())
        )
