"""Registry failures as job errors: the one translation of what a registry (or its token server)
answered, or of why it could not be reached, into :mod:`mlflow_dock.errors`.

Retryable or permanent is decided from the HTTP status and the exception type (`is_retryable`
then only looks at the class), never from message text. Every message is one line and has the
client's secrets (password, Basic value, tokens) blanked: registries echo request details into
their error bodies. `RegistryClient` and its auth flow (`oci.authflow`) both raise through
`RegistryErrors`.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import httpx

from mlflow_dock.errors import JobError, PermanentError, RetryableError

__all__ = [
    "Op",
    "RegistryError",
    "RegistryErrors",
    "RegistryPermanentError",
    "RegistryRetryableError",
    "error_entries",
    "ref_text",
]

_DETAIL_MAX: Final = 300


class RegistryError(JobError):
    """A registry operation failed; ``status_code`` is the HTTP status when there was one."""

    def __init__(
        self, message: str, *, status_code: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        # The first OCI error code from the body (e.g. "DENIED", "MANIFEST_UNKNOWN").
        self.code = code


class RegistryRetryableError(RetryableError, RegistryError):
    pass


class RegistryPermanentError(PermanentError, RegistryError):
    pass


@dataclass(frozen=True)
class Op:
    """What a request was for, so one function can word every error."""

    doing: str  # "getting manifest team/x:v1"
    repository: str | None = None
    reference: str | None = None
    # "get_manifest"/"get_blob" turn 404 into "manifest/blob ... not found"; "token"
    kind: str = "other"


def ref_text(repository: str, reference: str) -> str:
    """``repo:tag`` or ``repo@digest``, as messages name an image."""
    sep = "@" if ":" in reference else ":"
    return f"{repository}{sep}{reference}"


def error_entries(response: httpx.Response) -> list[tuple[str, str]]:
    """(code, message) pairs from an OCI error body, or a token server's error fields."""
    try:
        data = json.loads(response.content)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    entries: list[tuple[str, str]] = []
    errors = data.get("errors")
    if isinstance(errors, list):
        for item in errors:
            if isinstance(item, dict):
                entries.append((str(item.get("code") or ""), str(item.get("message") or "")))
    # Docker Hub's token server says {"details": ...}; OAuth servers {"error": ...}.
    for key in ("details", "error_description", "error", "message"):
        if isinstance(data.get(key), str) and not entries:
            entries.append(("", data[key]))
    return entries


# An upload session the registry no longer honours: unknown (expired, cancelled) or invalid
# (Distribution 2.x cancels a session whose signed _state lags the bytes it holds, which happens
# when a broken-off chunk's bytes land after we asked how far it got). The cure is a new session,
# not a retry of the same request and not a failed job.
_SESSION_LOST_CODES: Final = frozenset({"BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID"})


def upload_session_lost(error: RegistryError) -> bool:
    """True if the registry said an upload session is gone, so a new one should be opened."""
    return error.status_code in {400, 404} and error.code in _SESSION_LOST_CODES


def _is_certificate_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        current = current.__cause__ or current.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


class Secrets(Protocol):
    def secrets(self) -> Iterable[str]:
        """Every credential value the client has sent or received, to blank in messages."""
        ...


class RegistryErrors:
    """Builds the exceptions of one registry client: one line each, its secrets blanked."""

    def __init__(self, host: str, secrets: Secrets) -> None:
        self.host = host
        self._secrets = secrets

    def fail(
        self,
        message: str,
        *,
        retryable: bool = False,
        status_code: int | None = None,
        code: str | None = None,
    ) -> RegistryError:
        """Build the exception: one line, secrets blanked, whatever the message quoted."""
        cls = RegistryRetryableError if retryable else RegistryPermanentError
        return cls(self.redact(message), status_code=status_code, code=code)

    def redact(self, text: str) -> str:
        # Registries echo request details into error bodies; never pass our secrets on.
        text = " ".join(text.split())
        for secret in self._secrets.secrets():
            text = text.replace(secret, "<redacted>")
        return text

    def detail(self, response: httpx.Response) -> str:
        entries = error_entries(response)
        parts = [": ".join(p for p in (code, message) if p) for code, message in entries]
        detail = "; ".join(p for p in parts if p) or f"HTTP {response.status_code}"
        if len(detail) > _DETAIL_MAX:
            detail = detail[: _DETAIL_MAX - 3] + "..."
        return detail

    def error(
        self,
        op: Op,
        *,
        response: httpx.Response | None = None,
        exc: httpx.HTTPError | None = None,
    ) -> RegistryError:
        """The one translation of transport errors and non-2xx answers into job errors."""
        host = self.host
        if exc is not None:
            if isinstance(exc, httpx.TimeoutException):
                return self.fail(f"registry {host} timed out while {op.doing}", retryable=True)
            if _is_certificate_error(exc):
                return self.fail(
                    f"registry {host}: TLS certificate verification failed while {op.doing}"
                )
            if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError):
                return self.fail(
                    f"could not reach registry {host} while {op.doing}: "
                    f"{type(exc).__name__}: {exc}",
                    retryable=True,
                )
            return self.fail(f"registry {host} request failed while {op.doing}: {exc}")

        assert response is not None
        status = response.status_code
        entries = error_entries(response)
        code = next((c for c, _ in entries if c), None)
        detail = self.detail(response)
        if status in {408, 429} or status >= 500:
            return self.fail(
                f"registry {host} answered HTTP {status} while {op.doing}: {detail}",
                retryable=True,
                status_code=status,
                code=code,
            )
        if status in {401, 403}:
            target = op.repository or "the registry"
            return self.fail(
                f"registry {host} denied access to {target}: {detail}",
                status_code=status,
                code=code,
            )
        if status == 404 and op.kind == "get_manifest" and op.repository and op.reference:
            return self.fail(
                f"manifest {ref_text(op.repository, op.reference)} not found",
                status_code=status,
                code=code,
            )
        if status == 404 and op.kind == "get_blob" and op.repository and op.reference:
            return self.fail(
                f"blob {op.repository}@{op.reference} not found",
                status_code=status,
                code=code,
            )
        who = f"token server of registry {host}" if op.kind == "token" else None
        who = who or f"registry {host}"
        return self.fail(
            f"{who} answered HTTP {status} while {op.doing}: {detail}",
            status_code=status,
            code=code,
        )
