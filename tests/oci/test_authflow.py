"""Tests for mlflow_dock.oci.authflow: what the httpx auth flow adds to the registry's challenges.

The Basic/Bearer/refresh flows as a client sees them are in test_remote.py; these pin down what
only the flow decides: what a token request carries, redirects of the realm, the body of a
retried upload, secrets that outlive a refresh, and that it refuses async clients.
"""

from __future__ import annotations

import asyncio
import io
import json
import os

import httpx
import pytest

from mlflow_dock.errors import PermanentError
from mlflow_dock.oci.authflow import RegistryLogin
from mlflow_dock.oci.errors import Op, RegistryErrors
from mlflow_dock.oci.manifest import OCI_MANIFEST, Manifest
from support.registry import OciRegistry, basic_header, oci_errors, sha256

REPO = "team/iris"


def test_token_requests_carry_the_clients_timeout_and_user_agent() -> None:
    fake = OciRegistry(auth="bearer")
    with fake.client(timeout=7.0) as client:
        client.ping()
    (token,) = fake.token_requests
    assert token.extensions["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}
    assert token.headers["User-Agent"] == "mlflow-dock"
    assert token.headers["Authorization"] == basic_header(fake.username, fake.password)


def test_a_moved_realm_is_followed_for_a_put_and_gets_no_password_elsewhere() -> None:
    # httpx follows no redirect for a PUT; the flow follows its token request's itself.
    fake = OciRegistry(
        auth="bearer",
        username=None,  # the realm hands out tokens to anyone
        password=None,
        realm="https://login.example.com/token",
        verify_references=False,
    )

    def moved(request: httpx.Request) -> httpx.Response | None:
        if request.url.host != "login.example.com":
            return None
        target = request.url.copy_with(host="auth.example.com")
        return httpx.Response(307, headers={"Location": str(target)})

    fake.intercept = moved
    manifest = Manifest.from_bytes(json.dumps({"schemaVersion": 2}).encode(), OCI_MANIFEST)
    with fake.client(username="robot", password="pw-9f8e7d") as client:
        client.put_manifest(REPO, "v1", manifest)
    login = [e.request for e in fake.log if e.request.url.host == "login.example.com"]
    assert [r.headers.get("Authorization") for r in login] == [basic_header("robot", "pw-9f8e7d")]
    (token,) = fake.token_requests
    assert "Authorization" not in token.headers
    assert token.url.params.get_list("scope") == [f"repository:{REPO}:pull,push"]
    assert fake.tags[(REPO, "v1")] == manifest.digest


def test_a_challenged_chunk_of_a_stream_is_sent_again_from_its_start() -> None:
    fake = OciRegistry(auth="bearer")
    fake.fail_next("PUT", "upload", 401)
    payload = os.urandom((2 << 20) + 5)  # several chunks
    with fake.client() as client, io.BytesIO(b"header" + payload) as file:
        file.seek(len(b"header"))
        assert client.upload_blob(REPO, file) == sha256(payload)
    puts = [r for r in fake.requests if r.method == "PUT"]
    assert [len(r.content) for r in puts] == [len(payload), len(payload)]
    assert fake.blobs[(REPO, sha256(payload))] == payload


def test_credentials_replaced_by_a_refresh_stay_redacted() -> None:
    fake = OciRegistry(auth="basic")
    good = basic_header(fake.username, fake.password)

    def echo(request: httpx.Request) -> httpx.Response | None:
        # A registry that quotes, with the new credentials, what it was once sent.
        if request.headers.get("Authorization") == good:
            return httpx.Response(403, json=oci_errors("DENIED", "you sent expired-token-42"))
        return None

    fake.intercept = echo

    def refresh() -> tuple[str | None, str | None]:
        return "robot", fake.password

    with (
        fake.client(password="expired-token-42", refresh_credentials=refresh) as client,
        pytest.raises(PermanentError) as info,
    ):
        client.get_manifest(REPO, "v1")
    assert "expired-token-42" not in str(info.value)
    assert "<redacted>" in str(info.value)


def test_the_flow_is_for_sync_clients_only() -> None:
    login = RegistryLogin(username=None, password=None, scheme="https")
    flow = login.flow(Op("checking /v2/"), RegistryErrors("registry.example.com", login), ())

    async def send() -> None:
        transport = httpx.MockTransport(lambda _request: httpx.Response(200))
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get("https://registry.example.com/v2/", auth=flow)

    with pytest.raises(TypeError, match=r"httpx\.Client only"):
        asyncio.run(send())
