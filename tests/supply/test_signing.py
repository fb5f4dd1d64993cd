"""Tests for mlflow_dock.supply.signing: keys as openssl and cosign write them; failure modes."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import nacl.secret
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mlflow_dock.errors import ConfigError
from mlflow_dock.supply.signing import (
    Signer,
    load_signer,
    parse_signing_key,
    simple_signing_payload,
)
from support.cosign import encrypted_key

DIGEST = "sha256:" + "ab" * 32


def pkcs8_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cosign_encrypted_pem(
    key: ec.EllipticCurvePrivateKey,
    password: bytes,
    *,
    pem_type: str = "ENCRYPTED SIGSTORE PRIVATE KEY",
    n: int = 65536,
) -> bytes:
    """A key as `cosign generate-key-pair` writes it (see support/cosign.py for the format)."""
    return encrypted_key(key, password, pem_type=pem_type, n=n)


def cosign_pem(body_b64: str) -> bytes:
    kind = "ENCRYPTED SIGSTORE PRIVATE KEY"
    return f"-----BEGIN {kind}-----\n{body_b64}\n-----END {kind}-----\n".encode()


def verify(public: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> None:
    public.verify(signature, data, ec.ECDSA(hashes.SHA256()))


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- good keys ----------------------------------------------------------------------------------


def test_openssl_pkcs8_key_signs_what_the_public_key_verifies(tmp_path: Path, key):
    path = tmp_path / "key.pem"
    path.write_bytes(pkcs8_pem(key))
    signer = load_signer(path, None)
    signature = signer.sign(b"payload")
    verify(key.public_key(), b"payload", signature)  # DER ECDSA over SHA-256, as cosign
    assert signer.public_pem() == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_sec1_ec_private_key_is_accepted(key):
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert parse_signing_key(pem, None).keyid == Signer(key).keyid


def test_password_protected_pkcs8_key_is_accepted(key):
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    signer = parse_signing_key(pem, "pw")
    verify(key.public_key(), b"x", signer.sign(b"x"))


@pytest.mark.parametrize(
    "pem_type", ["ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY"]
)
def test_cosign_generated_key_is_decrypted_with_the_password(tmp_path: Path, key, pem_type):
    path = tmp_path / "cosign.key"
    path.write_bytes(cosign_encrypted_pem(key, b"correct horse", pem_type=pem_type))
    signer = load_signer(path, "correct horse")
    verify(key.public_key(), b"data", signer.sign(b"data"))


def test_sign_b64_and_verifies_round_trip(key):
    signer = Signer(key)
    signature = signer.sign_b64(b"payload")
    assert signer.verifies(b"payload", signature)
    assert not signer.verifies(b"payload!", signature)
    assert not signer.verifies(b"payload", "not base64!")


def test_repr_shows_no_key_material(key):
    text = repr(Signer(key))
    assert text.startswith("Signer(keyid='sha256:")


# --- simple signing payload ---------------------------------------------------------------------


def test_simple_signing_payload_is_cosigns_format():
    payload = simple_signing_payload("registry.example:5000/team/iris", DIGEST)
    assert payload == (
        b'{"critical":{"identity":{"docker-reference":"registry.example:5000/team/iris"},'
        b'"image":{"docker-manifest-digest":"' + DIGEST.encode() + b'"},'
        b'"type":"cosign container image signature"},"optional":null}'
    )


def test_tampered_payload_fails_verification(key):
    payload = simple_signing_payload("r/x", DIGEST)
    signature = Signer(key).sign(payload)
    tampered = payload.replace(b"ab", b"cd", 1)
    with pytest.raises(InvalidSignature):
        verify(key.public_key(), tampered, signature)


# --- one test per failure mode ------------------------------------------------------------------


def expect_config_error(match: str, data: bytes, password: str | None = None) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_signing_key(data, password)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("MLFLOW_DOCK_SIGNING_KEY")


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_signer(tmp_path / "absent.pem", None)


def test_not_pem():
    expect_config_error("not a PEM file", b"just some text")


def test_pem_without_end_line():
    expect_config_error("no '-----END", b"-----BEGIN PRIVATE KEY-----\nAAAA\n")


def test_pem_body_not_base64():
    expect_config_error(
        "not base64", b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n"
    )


def test_unexpected_pem_type(key):
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expect_config_error("'PUBLIC KEY' block", pem)


def test_garbage_pkcs8():
    expect_config_error(
        "not a readable private key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )


def test_wrong_curve():
    expect_config_error("secp384r1", pkcs8_pem(ec.generate_private_key(ec.SECP384R1())))


def test_not_ecdsa():
    expect_config_error("needs an ECDSA P-256 key", pkcs8_pem(ed25519.Ed25519PrivateKey.generate()))


def test_encrypted_pkcs8_without_password(key):
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    expect_config_error("encrypted; set MLFLOW_DOCK_SIGNING_KEY_PASSWORD", pem)


def test_plain_key_with_a_password(key):
    expect_config_error("not encrypted", pkcs8_pem(key), "pw")


def test_cosign_key_without_password(key):
    expect_config_error(
        "set MLFLOW_DOCK_SIGNING_KEY_PASSWORD", cosign_encrypted_pem(key, b"pw", n=32768)
    )


def test_cosign_key_with_wrong_password(key):
    pem = cosign_encrypted_pem(key, b"right", n=32768)
    expect_config_error("PASSWORD is wrong", pem, "wrong")
    # The password never appears in the message.
    with pytest.raises(ConfigError) as info:
        parse_signing_key(pem, "wrong")
    assert "wrong" not in str(info.value).replace("is wrong", "")


def test_cosign_key_with_unsupported_scrypt_parameters(key):
    # A tampered N would otherwise make start-up spend minutes (or gigabytes) deriving a key.
    expect_config_error(
        "unsupported scrypt parameters", cosign_encrypted_pem(key, b"pw", n=1024), "pw"
    )


def test_cosign_key_with_unknown_cipher(key):
    pem = cosign_encrypted_pem(key, b"pw", n=32768).decode()
    body = json.loads(base64.b64decode("".join(pem.splitlines()[1:-1])))
    body["cipher"]["name"] = "aes-gcm"
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    expect_config_error("unsupported kdf", cosign_pem(encoded), "pw")


def test_cosign_key_body_not_json():
    body = base64.b64encode(b"not json").decode()
    expect_config_error("not a readable cosign key", cosign_pem(body), "pw")


def test_cosign_key_sealing_something_else(key):
    # Right password, but the sealed bytes are not a PKCS#8 key.
    salt, nonce = os.urandom(32), os.urandom(24)
    box_key = Scrypt(salt=salt, length=32, n=32768, r=8, p=1).derive(b"pw")
    sealed = nacl.secret.SecretBox(box_key).encrypt(b"junk", nonce).ciphertext
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    body = json.dumps(
        {
            "kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": b64(salt)},
            "cipher": {"name": "nacl/secretbox", "nonce": b64(nonce)},
            "ciphertext": b64(sealed),
        }
    ).encode()
    expect_config_error("not a PKCS#8 key", cosign_pem(b64(body)), "pw")
