"""Unit tests for mlflow_dock.oci.remote (and its auth flow, oci.authflow) against the shared
in-memory registry (tests/support/registry.py), or a scripted handler where one wire behaviour is
the point of the test.

The live behaviour of a real registry is in tests/integration/test_registry_live.py; these
pin down the edge cases a real Distribution never produces on demand (Bearer realms, rate
limits, lying digests, registries that cannot delete by tag).
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from collections.abc import Callable

import httpx
import pytest

from mlflow_dock.errors import JobError, PermanentError, RetryableError, is_retryable
from mlflow_dock.oci import auth as auth_module
from mlflow_dock.oci.manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Manifest
from mlflow_dock.oci.remote import (
    RegistryClient,
    RegistryError,
)
from support.registry import OciRegistry, oci_errors

USER = "robot"
PASSWORD = "hunter2-Sup3r-s3cret"  # long and unusual so a leak is unambiguous
TOKEN = "tok-abcdef-0123456789"
REPO = "team/iris-classifier-1a2b3c4d5e"

# Pretty-printed with odd spacing on purpose: any json.loads/json.dumps round trip changes it.
MANIFEST_BODY = (
    b'{\n   "schemaVersion": 2,\n   "mediaType":'
    b' "application/vnd.docker.distribution.manifest.v2+json",'
    b'\n   "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1,'
    b' "digest": "sha256:aaaa"},\n   "layers": []\n}'
)
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST_BODY).hexdigest()

Handler = Callable[[httpx.Request], httpx.Response]


def basic(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def client_for(handler: Handler, host: str = "registry.example.com", **kwargs: object):
    kwargs.setdefault("username", USER)
    kwargs.setdefault("password", PASSWORD)
    return RegistryClient(host, transport=httpx.MockTransport(handler), **kwargs)  # type: ignore[arg-type]


def fake_registry(auth: str = "none", **kwargs: object) -> OciRegistry:
    """The shared registry with this module's credentials and tokens ("<TOKEN>-1", ...).

    Bearer mode is Docker-Hub-like: every request is challenged with exactly the scope it
    needs. Manifests here name blobs nobody pushed, so the registry does not check them.
    """
    return OciRegistry(
        auth=auth,  # type: ignore[arg-type]
        username=USER,
        password=PASSWORD,
        token_prefix=TOKEN,
        verify_references=False,
        **kwargs,  # type: ignore[arg-type]
    )


def with_manifest(fake: OciRegistry, ref: str = "v1") -> OciRegistry:
    fake.put_manifest(REPO, MANIFEST_BODY, DOCKER_MANIFEST, tag=ref)
    return fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(auth_module, "_now", lambda: now[0])
    return now


# --------------------------------------------------------------------------- auth: Basic


def test_basic_challenge_is_answered_and_then_sent_up_front() -> None:
    fake = with_manifest(fake_registry(auth="basic"))
    with client_for(fake) as client:
        manifest = client.get_manifest(REPO, "v1")
        assert manifest.body == MANIFEST_BODY
        assert [r.headers.get("Authorization") for r in fake.requests] == [None, basic()]

        client.get_manifest(REPO, "v1")
    assert len(fake.requests) == 3, "credentials must go out up front once Basic was asked for"
    assert fake.requests[2].headers["Authorization"] == basic()


def test_basic_wrong_password_is_permanent_after_one_retry() -> None:
    fake = with_manifest(fake_registry(auth="basic"))
    with client_for(fake, password="wrong-password") as client:
        with pytest.raises(PermanentError) as info:
            client.get_manifest(REPO, "v1")
        # Second call: credentials already sent up front, so no pointless second retry.
        with pytest.raises(PermanentError):
            client.get_manifest(REPO, "v1")
    assert len(fake.requests) == 3
    assert str(info.value) == (
        f"registry registry.example.com denied access to {REPO}: "
        "UNAUTHORIZED: authentication required"
    )
    assert isinstance(info.value, RegistryError)
    assert info.value.status_code == 401
    assert info.value.code == "UNAUTHORIZED"


def test_basic_challenge_without_credentials_is_permanent() -> None:
    fake = with_manifest(fake_registry(auth="basic"))
    with client_for(fake, username=None, password=None) as client, pytest.raises(PermanentError):
        client.get_manifest(REPO, "v1")
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- auth: Bearer


def test_bearer_flow_uses_challenge_realm_service_scope_and_credentials(clock) -> None:
    fake = with_manifest(fake_registry(auth="bearer"))
    with client_for(fake) as client:
        assert client.get_manifest(REPO, "v1").digest == MANIFEST_DIGEST

    (token_request,) = fake.token_requests
    assert token_request.url.scheme == "https"
    assert token_request.url.path == "/token"
    assert token_request.url.params.get_list("service") == ["fake-registry"]
    assert token_request.url.params.get_list("scope") == [f"repository:{REPO}:pull"]
    assert token_request.headers["Authorization"] == basic()
    assert [r.headers.get("Authorization") for r in fake.requests] == [None, f"Bearer {TOKEN}-1"]


def test_bearer_token_is_cached_per_scope_until_expiry(clock) -> None:
    fake = with_manifest(fake_registry(auth="bearer", token_expires_in=300))
    with client_for(fake) as client:
        client.get_manifest(REPO, "v1")
        clock[0] += 200
        client.get_manifest(REPO, "v1")
        client.manifest_digest(REPO, "v1")  # HEAD needs pull too: same scope, same token
        assert len(fake.token_requests) == 1
        assert len(fake.requests) == 4, "a cached token goes out without a 401 round trip"

        clock[0] += 101  # past expires_in
        client.get_manifest(REPO, "v1")
        assert len(fake.token_requests) == 2


def test_bearer_token_defaults_to_60_seconds(clock) -> None:
    fake = with_manifest(fake_registry(auth="bearer"))  # token body has no expires_in
    with client_for(fake) as client:
        client.get_manifest(REPO, "v1")
        clock[0] += 30
        client.get_manifest(REPO, "v1")
        assert len(fake.token_requests) == 1
        clock[0] += 31
        client.get_manifest(REPO, "v1")
        assert len(fake.token_requests) == 2


def test_bearer_access_token_field_is_accepted(clock) -> None:
    fake = with_manifest(fake_registry(auth="bearer", token_field="access_token"))
    with client_for(fake) as client:
        assert client.get_manifest(REPO, "v1").body == MANIFEST_BODY
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}-1"


def test_put_and_delete_ask_for_push_and_delete_scopes(clock) -> None:
    fake = with_manifest(fake_registry(auth="bearer"))
    with client_for(fake) as client:
        assert client.tag(REPO, "v1", "champion") == MANIFEST_DIGEST
        assert client.delete_tag(REPO, "champion") is True
    scopes = [r.url.params.get_list("scope") for r in fake.token_requests]
    assert scopes == [
        [f"repository:{REPO}:pull"],
        [f"repository:{REPO}:pull,push"],
        [f"repository:{REPO}:pull,push,delete"],
    ]


def test_refused_cached_token_is_replaced_once(clock) -> None:
    fake = with_manifest(fake_registry(auth="bearer"))
    with client_for(fake) as client:
        client.get_manifest(REPO, "v1")
        fake.forget_tokens()  # the registry forgets every token it issued (e.g. key rotation)
        client.get_manifest(REPO, "v1")
    assert len(fake.token_requests) == 2
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}-1"


def test_bearer_anonymous_when_no_credentials() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.host == "auth.example.com":
            assert "Authorization" not in request.headers
            return httpx.Response(200, json={"token": "anon"})
        if request.headers.get("Authorization") != "Bearer anon":
            return httpx.Response(
                401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example.com/t"'}
            )
        return httpx.Response(200, json={})

    with client_for(handler, username=None, password=None) as client:
        client.ping()
    assert [r.url.host for r in requests] == [
        "registry.example.com",
        "auth.example.com",
        "registry.example.com",
    ]
    assert "scope" not in requests[1].url.params


def test_token_server_refusal_is_permanent_and_names_the_repository(clock) -> None:
    fake = with_manifest(fake_registry(auth="bearer"))
    with (
        client_for(fake, password="not-the-password") as client,
        pytest.raises(PermanentError) as info,
    ):
        client.get_manifest(REPO, "v1")
    assert str(info.value) == (
        f"registry registry.example.com denied access to {REPO}: incorrect username or password"
    )


def test_token_server_outage_is_retryable(clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            return httpx.Response(503, text="upstream down")
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example.com/t"'}
        )

    with client_for(handler) as client, pytest.raises(RetryableError):
        client.get_manifest(REPO, "v1")


def test_plain_http_realm_from_https_registry_gets_no_password() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="http://evil.example.com/t"'}
        )

    with client_for(handler) as client, pytest.raises(PermanentError, match="plain-http"):
        client.get_manifest(REPO, "v1")
    assert [r.url.host for r in seen] == ["registry.example.com"]


def test_bearer_preferred_when_registry_offers_both(clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            return httpx.Response(200, json={"token": TOKEN})
        if request.headers.get("Authorization") == f"Bearer {TOKEN}":
            return httpx.Response(200, json={})
        return httpx.Response(
            401,
            headers=[
                ("WWW-Authenticate", 'Basic realm="x"'),
                ("WWW-Authenticate", 'Bearer realm="https://auth.example.com/t"'),
            ],
        )

    with client_for(handler) as client:
        client.ping()


# --------------------------------------------------------------------------- hosts and schemes


@pytest.mark.parametrize("host", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_docker_hub_names_map_to_the_api_host(host: str) -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, headers={"Content-Type": DOCKER_MANIFEST}, content=MANIFEST_BODY)

    with client_for(handler, host=host) as client:
        client.get_manifest("acme/iris", "v1")
        client.get_manifest("python", "3.11")  # official images live under library/
    assert [str(u) for u in seen] == [
        "https://registry-1.docker.io/v2/acme/iris/manifests/v1",
        "https://registry-1.docker.io/v2/library/python/manifests/3.11",
    ]
    assert client.host == host, "messages keep the name the user configured"


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        ("localhost", "http://localhost"),
        ("localhost:5000", "http://localhost:5000"),
        ("LOCALHOST:5000", "http://LOCALHOST:5000"),
        ("127.0.0.1", "http://127.0.0.1"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("127.45.6.7:8080", "http://127.45.6.7:8080"),
        ("[::1]:5000", "http://[::1]:5000"),
        ("[::1]", "http://[::1]"),
        ("::1", "http://[::1]"),
        ("ghcr.io", "https://ghcr.io"),
        ("registry.example.com:5000", "https://registry.example.com:5000"),
        ("10.0.0.5:5000", "https://10.0.0.5:5000"),
        ("128.0.0.1:5000", "https://128.0.0.1:5000"),
        ("localhost.example.com", "https://localhost.example.com"),
        ("[fe80::1]:5000", "https://[fe80::1]:5000"),
        ("123456789012.dkr.ecr.eu-west-1.amazonaws.com", None),
        ("europe-west1-docker.pkg.dev", None),
        ("https://127.0.0.1:5000", "https://127.0.0.1:5000"),
        ("http://registry.internal:5000/", "http://registry.internal:5000"),
    ],
)
def test_default_scheme_follows_dockers_loopback_rule(host: str, base_url: str | None) -> None:
    client = RegistryClient(host)
    expected = base_url or f"https://{host}"
    assert client.base_url == expected
    client.close()


def test_clients_share_the_tls_context_they_are_given(monkeypatch) -> None:
    """A context made once per process, not a CA bundle loaded per client (~160 ms each)."""
    given: list[object] = []
    real = httpx.Client

    def client(*args, **kwargs):
        given.append(kwargs.get("verify"))
        return real(*args, **kwargs)

    monkeypatch.setattr("mlflow_dock.oci.remote.httpx.Client", client)
    context = ssl.create_default_context()
    for _ in range(2):
        RegistryClient("ghcr.io", ssl_context=context).close()
    RegistryClient("ghcr.io").close()
    assert given == [context, context, True]


def test_explicit_scheme_wins() -> None:
    with RegistryClient("localhost:5000", scheme="https") as client:
        assert client.base_url == "https://localhost:5000"
    with RegistryClient("registry.internal:5000", scheme="http") as client:
        assert client.base_url == "http://registry.internal:5000"


@pytest.mark.parametrize(
    "host", ["", "ghcr.io/team", "host:port", "[::1", "ftp://x", "[::1]x", "https://"]
)
def test_invalid_hosts_are_rejected(host: str) -> None:
    with pytest.raises(ValueError):
        RegistryClient(host)


def test_credentials_in_host_are_rejected_without_echo() -> None:
    with pytest.raises(ValueError) as info:
        RegistryClient(f"{USER}:{PASSWORD}@registry.example.com")
    assert PASSWORD not in str(info.value)


# --------------------------------------------------------------------------- manifests


def test_tag_puts_the_exact_bytes_with_the_served_media_type() -> None:
    fake = with_manifest(fake_registry())
    with client_for(fake) as client:
        assert client.tag(REPO, "v1", "champion") == MANIFEST_DIGEST
    put = fake.requests[-1]
    assert put.method == "PUT"
    assert put.url.path == f"/v2/{REPO}/manifests/champion"
    assert put.content == MANIFEST_BODY
    assert put.headers["Content-Type"] == DOCKER_MANIFEST


def test_get_manifest_accepts_all_four_manifest_types() -> None:
    fake = with_manifest(fake_registry())
    with client_for(fake) as client:
        client.get_manifest(REPO, "v1")
    accept = [t.strip() for t in fake.requests[0].headers["Accept"].split(",")]
    assert set(accept) == {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }


def test_get_by_digest_and_index_media_type() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    digest = Manifest.digest_of(body)
    fake = fake_registry()
    fake.put_manifest(REPO, body, OCI_INDEX)
    with client_for(fake) as client:
        manifest = client.get_manifest(REPO, digest)
    assert manifest == Manifest(body=body, media_type=OCI_INDEX, digest=digest)
    assert fake.requests[0].url.path == f"/v2/{REPO}/manifests/{digest}"


@pytest.mark.parametrize("content_type", ["application/json", "", "application/octet-stream"])
def test_media_type_falls_back_to_the_manifests_own_field(content_type: str) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": content_type} if content_type else {}
        return httpx.Response(200, headers=headers, content=body)

    with client_for(handler) as client:
        assert client.get_manifest(REPO, "v1").media_type == OCI_MANIFEST


def test_content_type_parameters_are_dropped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": f"{OCI_MANIFEST}; charset=utf-8"}, content=b"{}"
        )

    with client_for(handler) as client:
        assert client.get_manifest(REPO, "v1").media_type == OCI_MANIFEST


def test_digest_mismatch_with_docker_content_digest_is_permanent() -> None:
    lie = "sha256:" + "0" * 64

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": DOCKER_MANIFEST, "Docker-Content-Digest": lie}
        return httpx.Response(200, headers=headers, content=MANIFEST_BODY)

    with client_for(handler) as client, pytest.raises(PermanentError) as info:
        client.get_manifest(REPO, "v1")
    assert lie in str(info.value)
    assert MANIFEST_DIGEST in str(info.value)


def test_body_not_matching_the_requested_digest_is_permanent() -> None:
    asked = "sha256:" + "1" * 64

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": DOCKER_MANIFEST}, content=MANIFEST_BODY)

    with client_for(handler) as client, pytest.raises(PermanentError):
        client.get_manifest(REPO, asked)


def test_sha512_docker_content_digest_is_verified_with_sha512() -> None:
    good = "sha512:" + hashlib.sha512(MANIFEST_BODY).hexdigest()

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": DOCKER_MANIFEST, "Docker-Content-Digest": good}
        return httpx.Response(200, headers=headers, content=MANIFEST_BODY)

    with client_for(handler) as client:
        assert client.get_manifest(REPO, "v1").digest == MANIFEST_DIGEST


def test_put_rejects_a_registry_that_stored_other_bytes() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, headers={"Docker-Content-Digest": "sha256:" + "2" * 64})

    manifest = Manifest.from_bytes(MANIFEST_BODY, DOCKER_MANIFEST)
    with client_for(handler) as client, pytest.raises(PermanentError, match="not as the"):
        client.put_manifest(REPO, "champion", manifest)


def test_manifest_refuses_a_digest_that_is_not_its_bodys() -> None:
    with pytest.raises(ValueError):
        Manifest(body=MANIFEST_BODY, media_type=DOCKER_MANIFEST, digest="sha256:" + "0" * 64)


def test_manifest_digest_uses_head() -> None:
    fake = with_manifest(fake_registry())
    with client_for(fake) as client:
        assert client.manifest_digest(REPO, "v1") == MANIFEST_DIGEST
        assert client.manifest_digest(REPO, "missing") is None
    assert [r.method for r in fake.requests] == ["HEAD", "HEAD"]


def test_referrers_api_answer_is_the_index() -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"Content-Type": OCI_INDEX}, content=index)

    with client_for(handler) as client:
        assert client.referrers(REPO, MANIFEST_DIGEST) == index
    assert seen[0].url.path == f"/v2/{REPO}/referrers/{MANIFEST_DIGEST}"
    assert seen[0].headers["Accept"] == OCI_INDEX


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(404, json=oci_errors("NAME_UNKNOWN", "no route")),
        httpx.Response(405),
        httpx.Response(200, headers={"Content-Type": "text/html"}, content=b"<html>"),
    ],
)
def test_no_referrers_api_is_none(response: httpx.Response) -> None:
    with client_for(lambda _request: response) as client:
        assert client.referrers(REPO, MANIFEST_DIGEST) is None


def test_referrers_errors_are_translated() -> None:
    with client_for(lambda _request: httpx.Response(503)) as client:
        with pytest.raises(RetryableError):
            client.referrers(REPO, MANIFEST_DIGEST)
        with pytest.raises(PermanentError):
            client.referrers(REPO, "not-a-digest")


def test_manifest_digest_without_header_falls_back_to_get() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/missing"):
            return httpx.Response(404 if request.method == "GET" else 200)
        content = MANIFEST_BODY if request.method == "GET" else b""
        return httpx.Response(200, headers={"Content-Type": DOCKER_MANIFEST}, content=content)

    with client_for(handler) as client:
        assert client.manifest_digest(REPO, "v1") == MANIFEST_DIGEST
        assert client.manifest_digest(REPO, "missing") is None


@pytest.mark.parametrize(
    ("repository", "reference"),
    [
        ("Team/App", "v1"),
        ("team/../app", "v1"),
        ("team/app?x=1", "v1"),
        ("", "v1"),
        (REPO, "has space"),
        (REPO, "../v1"),
        (REPO, "x" * 129),
        (REPO, "-leading-dash"),
    ],
)
def test_invalid_names_fail_before_any_request(repository: str, reference: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with client_for(handler) as client:
        with pytest.raises(PermanentError, match="invalid"):
            client.get_manifest(repository, reference)
        with pytest.raises(PermanentError, match="invalid"):
            client.delete_tag(repository, reference)


# --------------------------------------------------------------------------- error mapping


def respond(status: int, **kwargs: object) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, **kwargs)  # type: ignore[arg-type]

    return handler


def fail_with(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("handler", "retryable", "status_code"),
    [
        (respond(429, json=oci_errors("TOOMANYREQUESTS", "slow down")), True, 429),
        (respond(500), True, 500),
        (respond(502, text="<html>bad gateway</html>"), True, 502),
        (respond(503), True, 503),
        (respond(504), True, 504),
        (respond(408), True, 408),
        (fail_with(httpx.ConnectError("connection refused")), True, None),
        (fail_with(httpx.ReadTimeout("timed out")), True, None),
        (fail_with(httpx.ConnectTimeout("timed out")), True, None),
        (fail_with(httpx.RemoteProtocolError("peer closed connection")), True, None),
        (fail_with(httpx.ReadError("reset by peer")), True, None),
        (respond(401), False, 401),
        (respond(403, json=oci_errors("DENIED", "requested access is denied")), False, 403),
        (respond(404, json=oci_errors("MANIFEST_UNKNOWN", "manifest unknown")), False, 404),
        (respond(400, json=oci_errors("NAME_INVALID", "bad name")), False, 400),
        (respond(410), False, 410),
    ],
)
def test_error_mapping(handler: Handler, retryable: bool, status_code: int | None) -> None:
    with client_for(handler) as client, pytest.raises(JobError) as info:
        client.get_manifest(REPO, "v1")
    exc = info.value
    assert is_retryable(exc) is retryable
    assert isinstance(exc, RetryableError if retryable else PermanentError)
    assert isinstance(exc, RegistryError)
    assert exc.status_code == status_code
    assert "\n" not in str(exc)
    assert "registry.example.com" in str(exc) or "not found" in str(exc)


def test_error_messages() -> None:
    def message(handler: Handler, call: str = "get") -> str:
        with client_for(handler) as client, pytest.raises(JobError) as info:
            if call == "get":
                client.get_manifest(REPO, "v1")
            else:
                client.put_manifest(REPO, "champion", Manifest.from_bytes(b"{}", OCI_MANIFEST))
        return str(info.value)

    assert message(respond(404, json=oci_errors("MANIFEST_UNKNOWN", "manifest unknown"))) == (
        f"manifest {REPO}:v1 not found"
    )
    assert message(respond(403, json=oci_errors("DENIED", "requested access is denied"))) == (
        f"registry registry.example.com denied access to {REPO}: DENIED: requested access is denied"
    )
    assert (
        message(respond(403)) == f"registry registry.example.com denied access to {REPO}: HTTP 403"
    )
    assert message(respond(503, text="oops\nmulti-line")) == (
        "registry registry.example.com answered HTTP 503 while getting manifest "
        f"{REPO}:v1: HTTP 503"
    )
    # 404 on a PUT is not "manifest not found": the repository or a blob is missing.
    assert message(respond(404, json=oci_errors("NAME_UNKNOWN", "repo unknown")), "put") == (
        f"registry registry.example.com answered HTTP 404 while putting manifest "
        f"{REPO}:champion: NAME_UNKNOWN: repo unknown"
    )
    long = message(respond(400, json=oci_errors("MANIFEST_INVALID", "x" * 2000)))
    assert len(long) < 500


def test_not_found_by_digest_uses_at_sign() -> None:
    digest = "sha256:" + "3" * 64
    with client_for(respond(404)) as client, pytest.raises(PermanentError) as info:
        client.get_manifest(REPO, digest)
    assert str(info.value) == f"manifest {REPO}@{digest} not found"


def test_tls_verification_failure_is_permanent() -> None:
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
    exc = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    exc.__cause__ = cause
    with client_for(fail_with(exc)) as client, pytest.raises(PermanentError, match="TLS"):
        client.ping()


def test_ping() -> None:
    with client_for(fake_registry(auth="basic")) as client:
        client.ping()
    with (
        client_for(fake_registry(auth="basic"), password="bad-password") as client,
        pytest.raises(PermanentError, match="denied access to the registry"),
    ):
        client.ping()


# --------------------------------------------------------------------------- delete_tag


def test_delete_tag_deletes_by_tag() -> None:
    fake = with_manifest(with_manifest(fake_registry(), "champion"))
    with client_for(fake) as client:
        assert client.delete_tag(REPO, "champion") is True
    (request,) = fake.requests
    assert request.method == "DELETE"
    assert request.url.path == f"/v2/{REPO}/manifests/champion"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(405, json=oci_errors("UNSUPPORTED", "The operation is unsupported.")),
        httpx.Response(405),
        # What CNCF Distribution 2.8 answers to a DELETE by tag.
        httpx.Response(
            400,
            json=oci_errors("DIGEST_INVALID", "provided digest did not match uploaded content"),
        ),
        httpx.Response(400),
        httpx.Response(501, json=oci_errors("UNSUPPORTED", "not implemented")),
    ],
)
def test_delete_tag_returns_false_when_registry_cannot_delete_by_tag(
    response: httpx.Response,
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response

    with client_for(handler) as client:
        assert client.delete_tag(REPO, "champion") is False
    # Never a fallback to DELETE by digest: that would remove the manifest for every tag.
    assert [(r.method, r.url.path) for r in seen] == [("DELETE", f"/v2/{REPO}/manifests/champion")]


def test_delete_tag_404_is_true_only_if_the_tag_is_really_gone() -> None:
    def handler_for(head_status: int) -> Handler:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "DELETE":
                return httpx.Response(404, json=oci_errors("MANIFEST_UNKNOWN", "unknown"))
            headers = {"Docker-Content-Digest": MANIFEST_DIGEST}
            return httpx.Response(head_status, headers=headers)

        return handler

    with client_for(handler_for(404)) as client:
        assert client.delete_tag(REPO, "champion") is True, "already gone: a retried job passes"
    with client_for(handler_for(200)) as client:
        assert client.delete_tag(REPO, "champion") is False, "404 route, tag still there"


@pytest.mark.parametrize(
    ("status", "error"), [(403, PermanentError), (503, RetryableError), (429, RetryableError)]
)
def test_delete_tag_other_failures_raise(status: int, error: type[Exception]) -> None:
    with client_for(respond(status)) as client, pytest.raises(error):
        client.delete_tag(REPO, "champion")


def test_delete_tag_refuses_digests() -> None:
    with client_for(respond(202)) as client, pytest.raises(PermanentError):
        client.delete_tag(REPO, MANIFEST_DIGEST)


# --------------------------------------------------------------------------- secrets


def test_password_and_token_never_in_repr_or_messages(clock) -> None:
    echo = f"bad credentials {USER}:{PASSWORD} token {TOKEN}-1 {basic()}"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            return httpx.Response(200, json={"token": f"{TOKEN}-1"})
        if request.headers.get("Authorization") is None:
            return httpx.Response(
                401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example.com/t"'}
            )
        # A registry that echoes what it was sent into its error message.
        return httpx.Response(403, json=oci_errors("DENIED", echo))

    client = client_for(handler)
    with pytest.raises(PermanentError) as info:
        client.get_manifest(REPO, "v1")
    text = str(info.value) + repr(info.value)
    for secret in (PASSWORD, f"{TOKEN}-1", basic().removeprefix("Basic ")):
        assert secret not in text
        assert secret not in repr(client)
        assert secret not in repr(vars(client))
    assert "<redacted>" in str(info.value)
    assert repr(client) == (
        "RegistryClient(host='registry.example.com', "
        "base_url='https://registry.example.com', username='robot')"
    )
    client.close()


def test_password_not_in_token_server_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            return httpx.Response(401, json={"details": f"wrong password {PASSWORD}"})
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example.com/t"'}
        )

    with client_for(handler) as client, pytest.raises(PermanentError) as info:
        client.get_manifest(REPO, "v1")
    assert PASSWORD not in str(info.value)


def test_password_not_in_transport_error() -> None:
    handler = fail_with(httpx.ConnectError(f"proxy said no to {PASSWORD}"))
    with client_for(handler) as client, pytest.raises(RetryableError) as info:
        client.get_manifest(REPO, "v1")
    assert PASSWORD not in str(info.value)


def test_password_not_logged(caplog: pytest.LogCaptureFixture, clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            return httpx.Response(200, json={"token": TOKEN})
        if request.headers.get("Authorization") is None:
            return httpx.Response(
                401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example.com/t"'}
            )
        return httpx.Response(405, json=oci_errors("UNSUPPORTED", f"no ({PASSWORD}, {TOKEN})"))

    caplog.set_level("DEBUG")
    with client_for(handler) as client:
        assert client.delete_tag(REPO, "champion") is False
    assert "cannot delete tag" in caplog.text
    assert PASSWORD not in caplog.text
    assert TOKEN not in caplog.text


# --------------------------------------------------------------------------- credential refresh


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_expired_credentials_are_refreshed_once_on_401(auth: str, clock) -> None:
    fake = with_manifest(fake_registry(auth=auth))
    refreshed: list[int] = []

    def refresh() -> tuple[str | None, str | None]:
        refreshed.append(1)
        return USER, PASSWORD

    with client_for(fake, password="expired-token", refresh_credentials=refresh) as client:
        assert client.manifest_digest(REPO, "v1") == MANIFEST_DIGEST
    assert refreshed == [1]


def test_credentials_still_refused_after_a_refresh_are_permanent(clock) -> None:
    fake = with_manifest(fake_registry(auth="basic"))
    refreshed: list[int] = []

    def refresh() -> tuple[str | None, str | None]:
        refreshed.append(1)
        return USER, "still-wrong"

    with (
        client_for(fake, password="expired", refresh_credentials=refresh) as client,
        pytest.raises(PermanentError),
    ):
        client.get_manifest(REPO, "v1")
    assert refreshed == [1]


# --------------------------------------------------------------------------- tag deletion strategy


def test_a_tag_deletion_strategy_replaces_the_oci_delete() -> None:
    """ECR's case: app.py hands the client ECR's own API; callers still call delete_tag."""
    fake = with_manifest(fake_registry(), "champion")
    calls: list[tuple[str, str]] = []

    def own_api(repository: str, tag: str) -> bool:
        calls.append((repository, tag))
        return True

    with client_for(fake, delete_tag=own_api) as client:
        assert client.delete_tag(f"/{REPO}/", "champion") is True
        with pytest.raises(PermanentError, match="invalid tag"):
            client.delete_tag(REPO, MANIFEST_DIGEST)
    assert calls == [(REPO, "champion")]
    assert fake.requests == [], "no OCI DELETE besides"
