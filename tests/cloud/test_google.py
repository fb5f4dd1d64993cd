"""Tests for mlflow_dock.cloud.google: a service-account key file whose token_uri is a local
OAuth2 token endpoint that verifies the signed JWT-bearer grant, reached through
google.auth.default(). Nothing here leaves 127.0.0.1: the Google metadata-server lookup is
switched off in the environment.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mlflow_dock.cloud.credentials import Credentials
from mlflow_dock.cloud.google import GoogleCredentials, is_google_host
from mlflow_dock.cloud.providers import make_provider
from mlflow_dock.errors import PermanentError, RetryableError
from support.cloud import ECR_HOST, GAR_HOST, FakeClock, free_port, service_account_info

GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


# -- hosts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("us-central1-docker.pkg.dev", True),
        ("us-central1-docker.pkg.dev/proj/repo", True),
        ("europe-docker.pkg.dev", True),
        ("gcr.io", True),
        ("eu.gcr.io/my-project", True),
        ("marketplace.gcr.io", True),
        ("docker.pkg.dev", False),
        ("pkg.dev", False),
        ("evilgcr.io", False),
        ("gcr.io.evil.example", False),
        ("us-central1-docker.pkg.dev.evil.example", False),
        ("ghcr.io", False),
        (ECR_HOST, False),
    ],
)
def test_is_google_host(host: str, expected: bool) -> None:
    assert is_google_host(host) is expected


# -- Google against a local OAuth2 token endpoint ---------------------------------------------


def _b64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


class TokenEndpoint:
    """A minimal OAuth2 token endpoint for the JWT-bearer grant (RFC 7523), as Google runs."""

    def __init__(self, public_key: rsa.RSAPublicKey, client_email: str) -> None:
        self.public_key = public_key
        self.client_email = client_email
        self.mode = "ok"
        self.grants: list[dict[str, Any]] = []
        self.attempts = 0
        self.issued = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                status, body = endpoint.answer(self.path, self.headers, form)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, headers: Any, form: dict[str, list[str]]) -> tuple[int, Any]:
        with self._lock:
            self.attempts += 1
            if path != "/token":
                return 404, {"error": "not_found"}
            if self.mode == "500":
                return 500, {"error": "internal_failure", "error_description": "backend down"}
            if headers.get("Content-Type") != "application/x-www-form-urlencoded":
                return 400, {"error": "invalid_request"}
            if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
                return 400, {"error": "unsupported_grant_type"}
            claims = self._verify(form.get("assertion", [""])[0])
            if claims is None or self.mode == "invalid_grant":
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Invalid JWT Signature.",
                }
            self.grants.append(claims)
            self.issued += 1
            return 200, {
                "access_token": f"ya29.test-token-{self.issued}",
                "expires_in": 3600,
                "token_type": "Bearer",
            }

    def _verify(self, assertion: str) -> dict[str, Any] | None:
        try:
            header_b64, payload_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url(header_b64))
            claims = json.loads(_b64url(payload_b64))
            if header.get("alg") != "RS256":
                return None
            self.public_key.verify(
                _b64url(signature_b64),
                f"{header_b64}.{payload_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, InvalidSignature):
            return None
        now = time.time()
        # google-auth always addresses the grant to Google's token endpoint, whatever the key
        # file's token_uri says; Google's endpoint checks exactly that audience.
        if claims.get("iss") != self.client_email or claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return None
        if not (claims["iat"] - 60 <= now <= claims["exp"] + 60):
            return None
        return dict(claims)


@pytest.fixture(scope="module")
def google_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, TokenEndpoint]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = service_account_info()
    info["private_key"] = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    endpoint = TokenEndpoint(key.public_key(), info["client_email"])
    info["token_uri"] = endpoint.url
    path = tmp_path_factory.mktemp("gcp") / "key.json"
    path.write_text(json.dumps(info))
    try:
        yield path, endpoint
    finally:
        endpoint.close()


@pytest.fixture
def google_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never gcloud's own ADC file, and never the metadata server at 169.254.169.254.
    from google.auth.compute_engine import _metadata

    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    # google-auth reads NO_GCE_CHECK and GCE_METADATA_HOST once, when _metadata is first
    # imported (maybe by another test), so its module setting is pinned too. GCE_METADATA_IP is
    # read per call: a closed loopback port is the backstop.
    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)
    monkeypatch.setattr(_metadata, "_GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)


@pytest.fixture
def token_endpoint(
    google_key: tuple[Path, TokenEndpoint], google_env: None, monkeypatch: pytest.MonkeyPatch
) -> TokenEndpoint:
    path, endpoint = google_key
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    endpoint.mode = "ok"
    endpoint.grants.clear()
    endpoint.attempts = 0
    return endpoint


def test_google_token_fetch_through_adc(token_endpoint: TokenEndpoint) -> None:
    provider = make_provider(registry=f"{GAR_HOST}/proj/repo", username=None, password=None)
    assert isinstance(provider, GoogleCredentials)
    creds = provider.get()
    assert creds.username == "oauth2accesstoken"
    assert creds.password.startswith("ya29.test-token-")
    assert creds.password not in repr(provider)
    assert creds.password not in repr(creds)
    [claims] = token_endpoint.grants
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert claims["iss"] == "pusher@test-project.iam.gserviceaccount.com"


def test_google_token_cached_and_refreshed_near_expiry(token_endpoint: TokenEndpoint) -> None:
    start = time.time()
    clock = FakeClock(start)
    provider = GoogleCredentials(registry_host=GAR_HOST, clock=clock, refresh_margin=300)
    first = provider.get()
    clock.now = start + 3600 - 300 - 30  # the token has 5.5 minutes left: still cached
    assert provider.get() is first
    assert len(token_endpoint.grants) == 1

    clock.now = start + 3600 - 300 + 30  # inside the 5-minute margin: a new token
    second = provider.get()
    assert second.password != first.password
    assert len(token_endpoint.grants) == 2
    # The new token's hour runs from the real now, so back at the real clock it is cached.
    clock.now = time.time()
    assert provider.get() is second
    assert len(token_endpoint.grants) == 2


def test_google_concurrent_gets_refresh_once(token_endpoint: TokenEndpoint) -> None:
    provider = GoogleCredentials(registry_host=GAR_HOST)
    barrier = threading.Barrier(6)
    results: list[Credentials] = []

    def worker() -> None:
        barrier.wait()
        results.append(provider.get())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len({r.password for r in results}) == 1
    assert len(results) == 6
    assert len(token_endpoint.grants) == 1


def test_google_endpoint_500_is_retryable(token_endpoint: TokenEndpoint) -> None:
    token_endpoint.mode = "500"
    provider = GoogleCredentials(registry_host=GAR_HOST)
    with pytest.raises(RetryableError) as info:
        provider.get()
    message = str(info.value)
    assert message.startswith(f"getting a Google access token for {GAR_HOST}: ")
    assert "\n" not in message
    # google-auth retried it itself before giving up; we add no retries on top.
    assert token_endpoint.attempts == 3
    # The provider recovers once the endpoint does.
    token_endpoint.mode = "ok"
    assert provider.get().username == "oauth2accesstoken"


def test_google_outage_inside_the_margin_serves_the_current_token(
    token_endpoint: TokenEndpoint,
) -> None:
    start = time.time()
    clock = FakeClock(start)
    provider = GoogleCredentials(registry_host=GAR_HOST, clock=clock, refresh_margin=300)
    first = provider.get()
    token_endpoint.mode = "500"
    clock.now = start + 3600 - 200  # due for refresh, but still valid for 200 s
    assert provider.get() is first
    assert token_endpoint.attempts == 1 + 3
    clock.now += 10  # within the retry interval: no new attempt
    assert provider.get() is first
    assert token_endpoint.attempts == 4

    token_endpoint.mode = "ok"
    clock.now += 30  # retry interval over: refreshed
    second = provider.get()
    assert second.password != first.password
    assert token_endpoint.attempts == 5


def test_google_outage_near_expiry_is_retryable(token_endpoint: TokenEndpoint) -> None:
    start = time.time()
    clock = FakeClock(start)
    provider = GoogleCredentials(registry_host=GAR_HOST, clock=clock)
    provider.get()
    token_endpoint.mode = "500"
    clock.now = start + 3600 - 30  # too close to expiry to push with
    with pytest.raises(RetryableError, match="Google token endpoint unavailable"):
        provider.get()


def test_google_invalid_grant_is_permanent(token_endpoint: TokenEndpoint) -> None:
    token_endpoint.mode = "invalid_grant"
    provider = GoogleCredentials(registry_host=GAR_HOST)
    with pytest.raises(PermanentError, match="invalid_grant") as info:
        provider.get()
    message = str(info.value)
    assert GAR_HOST in message
    assert "\n" not in message
    assert token_endpoint.attempts == 1


def test_google_unreachable_token_endpoint_is_retryable(
    google_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    info = service_account_info(token_uri=f"http://127.0.0.1:{free_port()}/token")
    path = tmp_path / "key.json"
    path.write_text(json.dumps(info))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    with pytest.raises(RetryableError, match="cannot reach the Google token endpoint"):
        GoogleCredentials(registry_host=GAR_HOST).get()


def test_google_missing_adc_file_is_permanent(
    google_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(PermanentError, match="no usable Google application default credentials"):
        GoogleCredentials(registry_host="gcr.io").get()


def test_google_no_adc_anywhere_is_permanent(
    google_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(PermanentError, match=rf"for {GAR_HOST}: no usable Google"):
        GoogleCredentials(registry_host=GAR_HOST).get()


def test_google_tokens_are_refreshable() -> None:
    assert GoogleCredentials(registry_host=GAR_HOST).refreshable is True
