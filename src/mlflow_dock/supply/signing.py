"""cosign-compatible key-based signing: keys, the simple-signing payload, ECDSA P-256.

What cosign verifies for ``cosign verify --key cosign.pub <image>``: the ``sha256-<hex>.sig``
manifest's layers are simple-signing payloads (JSON naming the image's manifest digest); each
layer's annotation ``dev.cosignproject.cosign/signature`` is the base64 of an ASN.1 DER ECDSA
signature over the payload's bytes (SHA-256). Nothing else is signed, so this module is small.

Keys, as ``MLFLOW_DOCK_SIGNING_KEY`` may name them:
- a PEM PKCS#8 ECDSA P-256 key (``openssl genpkey -algorithm EC -pkeyopt
  ec_paramgen_curve:P-256``), or the SEC1 ``EC PRIVATE KEY`` form older openssl writes;
- a key from ``cosign generate-key-pair``: PEM type ``ENCRYPTED SIGSTORE PRIVATE KEY`` (older
  cosign: ``ENCRYPTED COSIGN PRIVATE KEY``) whose body is go-securesystemslib's ``encrypted``
  JSON: scrypt (N, r, p, salt) derives a 32-byte key, NaCl secretbox (nonce) seals the PKCS#8 DER.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.secret
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mlflow_dock.errors import ConfigError

__all__ = [
    "COSIGN_PEM_TYPES",
    "SIGNATURE_ANNOTATION",
    "SIMPLE_SIGNING_MEDIA_TYPE",
    "Signer",
    "load_signer",
    "parse_signing_key",
    "simple_signing_payload",
]

SIMPLE_SIGNING_MEDIA_TYPE: Final = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION: Final = "dev.cosignproject.cosign/signature"
COSIGN_PEM_TYPES: Final = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")

# go-securesystemslib accepts exactly these scrypt settings (legacy, standard, OWASP) and refuses
# others, so a tampered file cannot make us spend minutes or gigabytes deriving a key.
_SCRYPT_PARAMS: Final = frozenset({(32768, 8, 1), (65536, 8, 1), (131072, 8, 1)})
_VARIABLE: Final = "MLFLOW_DOCK_SIGNING_KEY"


class Signer:
    """An ECDSA P-256 key that signs bytes the way cosign's key-based signing does."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ConfigError(
                f"{_VARIABLE}: the key is on curve {private_key.curve.name}; cosign-compatible "
                "signing needs ECDSA P-256 (secp256r1)"
            )
        self._key = private_key

    def __repr__(self) -> str:
        return f"Signer(keyid={self.keyid!r})"

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def public_pem(self) -> bytes:
        """The public key as ``cosign.pub`` holds it (PEM SubjectPublicKeyInfo)."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def keyid(self) -> str:
        """A stable name for the key: sha256 of its DER public key (shown, never secret)."""
        der = self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = hashes.Hash(hashes.SHA256())
        digest.update(der)
        return "sha256:" + digest.finalize().hex()

    def sign(self, data: bytes) -> bytes:
        """ASN.1 DER ECDSA signature over SHA-256(data)."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def sign_b64(self, data: bytes) -> str:
        return base64.b64encode(self.sign(data)).decode("ascii")

    def verifies(self, data: bytes, signature_b64: str) -> bool:
        """Whether ``signature_b64`` is this key's signature over ``data``."""
        try:
            signature = base64.b64decode(signature_b64, validate=True)
            self.public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True


def simple_signing_payload(docker_reference: str, manifest_digest: str) -> bytes:
    """cosign's payload: the image (repository without tag) and its manifest digest.

    Key order and compact separators as Go's encoding/json writes the struct, so the payload is
    byte for byte what cosign itself would sign for this image.
    """
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def load_signer(path: Path, password: str | None) -> Signer:
    """Read the signing key; any problem is one ConfigError line naming the variable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{_VARIABLE}: cannot read {path}: {exc.strerror or exc}") from None
    return parse_signing_key(data, password, source=str(path))


def parse_signing_key(data: bytes, password: str | None, *, source: str = "key") -> Signer:
    pem_type, body = _pem_block(data, source)
    if pem_type in COSIGN_PEM_TYPES:
        if not password:
            raise ConfigError(
                f"{_VARIABLE}: {source} is a cosign key encrypted with a password; set "
                "MLFLOW_DOCK_SIGNING_KEY_PASSWORD"
            )
        der = _decrypt_cosign(body, password.encode("utf-8"), source)
        key = _load_der(der, source)
    elif pem_type in {"PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY"}:
        try:
            loaded = serialization.load_pem_private_key(
                data,
                password=password.encode("utf-8") if password else None,
            )
        except TypeError:
            # cryptography says TypeError for "encrypted but no password" and the reverse.
            raise ConfigError(
                f"{_VARIABLE}: {source} is "
                + (
                    "encrypted; set MLFLOW_DOCK_SIGNING_KEY_PASSWORD"
                    if pem_type == "ENCRYPTED PRIVATE KEY"
                    else "not encrypted; unset MLFLOW_DOCK_SIGNING_KEY_PASSWORD"
                )
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(
                f"{_VARIABLE}: {source} is not a readable private key (or the password is wrong)"
            ) from None
        key = _ecdsa(loaded, source)
    else:
        raise ConfigError(
            f"{_VARIABLE}: {source} holds a PEM '{pem_type}' block; expected an ECDSA P-256 "
            "'PRIVATE KEY' or a cosign 'ENCRYPTED SIGSTORE PRIVATE KEY'"
        )
    return Signer(key)


def _pem_block(data: bytes, source: str) -> tuple[str, bytes]:
    text = data.decode("ascii", errors="replace")
    begin = text.find("-----BEGIN ")
    if begin < 0:
        raise ConfigError(f"{_VARIABLE}: {source} is not a PEM file")
    head_end = text.find("-----", begin + 11)
    if head_end < 0:
        raise ConfigError(f"{_VARIABLE}: {source} has a malformed PEM header")
    pem_type = text[begin + 11 : head_end]
    end_marker = f"-----END {pem_type}-----"
    end = text.find(end_marker, head_end)
    if end < 0:
        raise ConfigError(f"{_VARIABLE}: {source} has no '{end_marker}' line")
    lines = text[head_end + 5 : end].strip().splitlines()
    # PEM headers ("Proc-Type: ...") come before a blank line; cosign writes none.
    payload = "".join(line.strip() for line in lines if ":" not in line)
    try:
        body = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ConfigError(f"{_VARIABLE}: {source} has a PEM body that is not base64") from None
    return pem_type, body


def _b64_field(doc: dict[str, Any], *path: str) -> bytes:
    value: Any = doc
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, str):
        raise ValueError(f"missing {'.'.join(path)}")
    return base64.b64decode(value, validate=True)


def _decrypt_cosign(body: bytes, password: bytes, source: str) -> bytes:
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        kdf, cipher = doc.get("kdf") or {}, doc.get("cipher") or {}
        if kdf.get("name") != "scrypt" or cipher.get("name") != "nacl/secretbox":
            raise ValueError(f"unsupported kdf {kdf.get('name')!r} / {cipher.get('name')!r}")
        params = kdf.get("params") or {}
        n, r, p = params.get("N"), params.get("r"), params.get("p")
        if (n, r, p) not in _SCRYPT_PARAMS:
            raise ValueError(f"unsupported scrypt parameters N={n} r={r} p={p}")
        salt = _b64_field(doc, "kdf", "salt")
        nonce = _b64_field(doc, "cipher", "nonce")
        ciphertext = _b64_field(doc, "ciphertext")
        if len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
            raise ValueError("nonce is not 24 bytes")
    except (ValueError, binascii.Error, AttributeError) as exc:
        raise ConfigError(f"{_VARIABLE}: {source} is not a readable cosign key: {exc}") from None
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    box_key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)
    try:
        return nacl.secret.SecretBox(box_key).decrypt(ciphertext, nonce)
    except nacl.exceptions.CryptoError:
        raise ConfigError(
            f"{_VARIABLE}: cannot decrypt {source}: MLFLOW_DOCK_SIGNING_KEY_PASSWORD is wrong"
        ) from None


def _load_der(der: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    try:
        loaded = serialization.load_der_private_key(der, password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise ConfigError(
            f"{_VARIABLE}: {source} decrypted to something that is not a PKCS#8 key"
        ) from None
    return _ecdsa(loaded, source)


def _ecdsa(key: object, source: str) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"{_VARIABLE}: {source} is a {type(key).__name__.lstrip('_')}; cosign-compatible "
            "signing here needs an ECDSA P-256 key"
        )
    return key
