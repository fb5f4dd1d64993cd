from __future__ import annotations

import json

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from mlflow_dock.errors import HeaderError, SignatureError, TimestampError
from mlflow_dock.intake.signatures import WebhookVerifier, sign

NOW = 1_790_000_000
BODY = json.dumps(
    {
        "entity": "model_version",
        "action": "created",
        "timestamp": "2026-11-26T14:16:12.929590+00:00",
        "data": {"name": "Iris Classifier", "version": "2", "source": "models:/m-1"},
    }
).encode()


def headers(secret: str = "s3cret", ts: int = NOW, delivery: str = "d-1", body: bytes = BODY):
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": str(ts),
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, str(ts), body.decode()),
    }


def verifier(*secrets: str, tolerance: int = 300) -> WebhookVerifier:
    return WebhookVerifier(secrets or ("s3cret",), tolerance_seconds=tolerance, clock=lambda: NOW)


@pytest.mark.parametrize(
    ("secret", "delivery", "ts", "body"),
    [
        ("s3cret", "d-1", "1790000000", '{"a": 1}'),
        ("ünïcode-sëcret", "3f2b", "0", "{}"),
        ("k", "x" * 100, "123", json.dumps({"name": "模型"})),
    ],
)
def test_sign_matches_mlflow_oracle(secret, delivery, ts, body):
    assert sign(secret, delivery, ts, body.encode()) == _generate_hmac_signature(
        secret, delivery, ts, body
    )


def test_valid_delivery_returns_delivery_id():
    assert verifier().verify(BODY, headers()) == "d-1"


def test_header_names_are_case_insensitive():
    lowered = {k.lower(): v for k, v in headers().items()}
    assert verifier().verify(BODY, lowered) == "d-1"


def test_raw_bytes_are_verified_not_reserialised_json():
    reformatted = json.dumps(json.loads(BODY), separators=(",", ":")).encode()
    with pytest.raises(SignatureError):
        verifier().verify(reformatted, headers())


def test_tampered_body_is_rejected():
    with pytest.raises(SignatureError, match="invalid"):
        verifier().verify(BODY.replace(b'"2"', b'"3"'), headers())


def test_wrong_secret_is_rejected():
    with pytest.raises(SignatureError):
        verifier().verify(BODY, headers(secret="other"))


def test_previous_secret_is_accepted_during_rotation():
    assert verifier("new", "old").verify(BODY, headers(secret="old")) == "d-1"
    assert verifier("new", "old").verify(BODY, headers(secret="new")) == "d-1"
    with pytest.raises(SignatureError):
        verifier("new").verify(BODY, headers(secret="old"))


def test_missing_signature_is_401():
    h = headers()
    del h["X-MLflow-Signature"]
    with pytest.raises(SignatureError, match="missing"):
        verifier().verify(BODY, h)


@pytest.mark.parametrize("value", ["sha256=abcd", "v2,abcd", "v1,", "garbage", "v1,ünï"])
def test_malformed_signature_is_401(value):
    h = headers()
    h["X-MLflow-Signature"] = value
    with pytest.raises(SignatureError):
        verifier().verify(BODY, h)


def test_signature_for_another_delivery_id_is_rejected():
    h = headers()
    h["X-MLflow-Delivery-Id"] = "d-2"
    with pytest.raises(SignatureError):
        verifier().verify(BODY, h)


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_timestamp_inside_symmetric_window(skew):
    assert verifier().verify(BODY, headers(ts=NOW + skew))


@pytest.mark.parametrize("skew", [-301, 301, -100_000])
def test_timestamp_outside_window_is_400(skew):
    with pytest.raises(TimestampError, match="allowed: 300"):
        verifier().verify(BODY, headers(ts=NOW + skew))


@pytest.mark.parametrize("value", ["", "abc", "1.5", "-5", "+1790000000", "١٢٣", "9" * 40])
def test_malformed_timestamp_is_400(value):
    h = headers()
    h["X-MLflow-Timestamp"] = value
    with pytest.raises(TimestampError):
        verifier().verify(BODY, h)


def test_missing_timestamp_is_400():
    h = headers()
    del h["X-MLflow-Timestamp"]
    with pytest.raises(TimestampError, match="missing"):
        verifier().verify(BODY, h)


def test_missing_delivery_id_is_400():
    h = headers()
    del h["X-MLflow-Delivery-Id"]
    with pytest.raises(HeaderError):
        verifier().verify(BODY, h)


def test_repr_hides_secrets():
    assert "s3cret" not in repr(verifier())


def test_requires_a_secret():
    with pytest.raises(ValueError, match="secret"):
        WebhookVerifier([""])
