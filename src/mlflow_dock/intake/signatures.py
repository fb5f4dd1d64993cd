"""Verification of MLflow webhook signatures (pure: the clock is injected).

MLflow signs `f"{delivery_id}.{timestamp}.{raw_body}"` with HMAC-SHA256 and sends
`X-MLflow-Signature: v1,<base64>`. Verification happens on the raw bytes before anything is
parsed, so an unauthenticated caller learns nothing about what we would accept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Mapping

from mlflow_dock.errors import HeaderError, SignatureError, TimestampError

SIGNATURE_HEADER = "x-mlflow-signature"
DELIVERY_ID_HEADER = "x-mlflow-delivery-id"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
_VERSION_PREFIX = "v1,"
_MAX_DELIVERY_ID_LENGTH = 200


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The header value MLflow would send; used by tests and by `verify`."""
    message = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return _VERSION_PREFIX + base64.b64encode(digest).decode("ascii")


class WebhookVerifier:
    """Checks one delivery against the current and (during rotation) previous secrets."""

    def __init__(
        self,
        secrets: Iterable[str],
        *,
        tolerance_seconds: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = tuple(s for s in secrets if s)
        if not self._secrets:
            raise ValueError("at least one webhook secret is required")
        self._tolerance = tolerance_seconds
        self._clock = clock

    def __repr__(self) -> str:
        return (
            f"WebhookVerifier(secrets=<{len(self._secrets)} hidden>, tolerance={self._tolerance})"
        )

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str:
        """Return the delivery id of an authentic, fresh delivery; raise otherwise."""
        lowered = {k.lower(): v for k, v in headers.items()}
        timestamp = self._check_timestamp(lowered.get(TIMESTAMP_HEADER))
        delivery_id = lowered.get(DELIVERY_ID_HEADER, "").strip()
        if not delivery_id:
            raise HeaderError("missing X-MLflow-Delivery-Id header")
        if len(delivery_id) > _MAX_DELIVERY_ID_LENGTH or not delivery_id.isprintable():
            raise HeaderError("malformed X-MLflow-Delivery-Id header")
        signature = lowered.get(SIGNATURE_HEADER, "").strip()
        if not signature:
            raise SignatureError("missing X-MLflow-Signature header")
        if not signature.startswith(_VERSION_PREFIX):
            raise SignatureError("unsupported signature scheme (expected 'v1,<base64>')")
        expected = signature.encode("utf-8", "replace")
        # Compare against every configured secret without short-circuiting on the first match,
        # so timing does not reveal which secret (current or previous) a forger hit.
        valid = False
        for secret in self._secrets:
            candidate = sign(secret, delivery_id, timestamp, body).encode("ascii")
            valid |= hmac.compare_digest(candidate, expected)
        if not valid:
            raise SignatureError("invalid webhook signature")
        return delivery_id

    def _check_timestamp(self, raw: str | None) -> str:
        if raw is None or not raw.strip():
            raise TimestampError("missing X-MLflow-Timestamp header")
        raw = raw.strip()
        # MLflow sends whole seconds as ASCII digits; anything else (floats, signs, unicode
        # digits that int() would accept) is not what was signed.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
            raise TimestampError("malformed X-MLflow-Timestamp header (expected Unix seconds)")
        skew = abs(self._clock() - int(raw))
        if skew > self._tolerance:
            raise TimestampError(
                f"X-MLflow-Timestamp is {int(skew)} s away from server time "
                f"(allowed: {self._tolerance} s)"
            )
        return raw
