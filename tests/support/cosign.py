"""cosign's published formats, written out independently of mlflow_dock.supply for the tests.

- `encrypted_key`: a private key as `cosign generate-key-pair` writes it (pkg/cosign/keys.go:
  PKCS#8 DER sealed by go-securesystemslib's `encrypted.Encrypt`: 32-byte salt, scrypt N=65536
  r=8 p=1 to a 32-byte key, NaCl secretbox with a 24-byte nonce, JSON with standard base64,
  PEM type ENCRYPTED SIGSTORE PRIVATE KEY).
- `verify_signature_layer`: what `cosign verify --key` checks for one layer of the `.sig`
  manifest: the base64 annotation is an ASN.1 DER ECDSA P-256 signature over SHA-256 of the
  layer blob (the simple-signing payload), and the payload names the image's manifest digest.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import nacl.secret
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypted_key(
    key: ec.EllipticCurvePrivateKey,
    password: bytes,
    *,
    pem_type: str = "ENCRYPTED SIGSTORE PRIVATE KEY",
    n: int = 65536,
) -> bytes:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt, nonce = os.urandom(32), os.urandom(24)
    box_key = Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(password)
    return sealed_pem(
        {
            "kdf": {"name": "scrypt", "params": {"N": n, "r": 8, "p": 1}, "salt": _b64(salt)},
            "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
            "ciphertext": _b64(nacl.secret.SecretBox(box_key).encrypt(der, nonce).ciphertext),
        },
        pem_type=pem_type,
    )


def sealed_pem(body: dict[str, Any] | bytes, *, pem_type: str = "ENCRYPTED SIGSTORE PRIVATE KEY"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    text = _b64(raw)
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {pem_type}-----\n{lines}\n-----END {pem_type}-----\n".encode()


def verify_signature_layer(
    public_key: ec.EllipticCurvePublicKey, layer: dict[str, Any], blob: bytes
) -> dict[str, Any]:
    """Verify one `.sig` layer; returns the payload. Raises InvalidSignature if it fails."""
    assert layer["mediaType"] == SIMPLE_SIGNING
    signature = base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION])
    public_key.verify(signature, blob, ec.ECDSA(hashes.SHA256()))
    payload: dict[str, Any] = json.loads(blob)
    return payload
