"""RegistryClient against a real CNCF Distribution registry with htpasswd (Basic) auth.

Images are made with `docker import` of a one-file tarball (nothing can be pulled here) and
pushed with the docker SDK's per-call ``auth_config``; everything after the push goes through
RegistryClient only, the way an alias job does it.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator

import docker
import docker.errors
import httpx
import pytest

from mlflow_dock.errors import PermanentError
from mlflow_dock.oci.manifest import DOCKER_MANIFEST
from mlflow_dock.oci.remote import RegistryClient, RegistryPermanentError
from support import web
from support.servers import RegistryServer

pytestmark = pytest.mark.integration

Push = Callable[[str, str, bytes], str]


def one_file_tar(content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("model.txt")
        info.size = len(content)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def distribution_major_version() -> int | None:
    binary = shutil.which("docker-registry")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    # "docker-registry github.com/docker/distribution 2.8.2+ds1"
    match = re.search(r"\s(\d+)\.\d+", out.stdout)
    return int(match.group(1)) if match else None


@pytest.fixture
def repo() -> str:
    # The registry is shared by the whole session; a fresh repository keeps tests independent.
    return f"it-registry/tiny-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def push(docker_client: docker.DockerClient, registry: RegistryServer) -> Iterator[Push]:
    """Import a one-file image locally, push it, return the digest the engine reported."""
    pushed: list[str] = []

    def push(repository: str, tag: str, content: bytes) -> str:
        name = f"{registry.host}/{repository}"
        docker_client.api.import_image_from_data(one_file_tar(content), repository=name, tag=tag)
        pushed.append(f"{name}:{tag}")
        digest = None
        for line in docker_client.images.push(
            name, tag=tag, stream=True, decode=True, auth_config=registry.auth_config
        ):
            # The SDK does not raise on a failed push: the error is a line of the stream.
            assert "error" not in line, line
            digest = (line.get("aux") or {}).get("Digest") or digest
        assert digest, "push reported no digest"
        return str(digest)

    yield push
    for ref in pushed:
        # NotFound: a test already removed it to pull it back from the registry.
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.images.remove(ref, force=True, noprune=True)


@pytest.fixture
def client(registry: RegistryServer) -> Iterator[RegistryClient]:
    with RegistryClient(registry.host, username=registry.username, password=registry.password) as c:
        yield c


def test_loopback_registry_is_spoken_to_over_http(
    registry: RegistryServer, client: RegistryClient
) -> None:
    assert client.base_url == registry.url
    client.ping()


def test_alias_points_at_the_version_digest_and_moves(
    registry: RegistryServer,
    docker_client: docker.DockerClient,
    push: Push,
    client: RegistryClient,
    repo: str,
) -> None:
    v1 = push(repo, "1", b"model version one\n")

    manifest = client.get_manifest(repo, "1")
    assert manifest.digest == v1
    assert manifest.media_type == DOCKER_MANIFEST

    assert client.tag(repo, "1", "champion") == v1
    assert client.manifest_digest(repo, "champion") == v1
    assert client.get_manifest(repo, "champion").body == manifest.body, "same bytes, same digest"

    # Tagging by digest is what the alias job does (it knows the build's digest).
    assert client.tag(repo, v1, "challenger") == v1
    assert client.manifest_digest(repo, "challenger") == v1

    # Moving the alias to a second version.
    v2 = push(repo, "2", b"model version two\n")
    assert v2 != v1
    assert client.tag(repo, "2", "champion") == v2
    assert client.manifest_digest(repo, "champion") == v2
    assert client.manifest_digest(repo, "1") == v1
    assert client.manifest_digest(repo, "challenger") == v1

    # The alias is a real image to Docker, not just a registry record: pull it back.
    name = f"{registry.host}/{repo}"
    docker_client.images.remove(f"{name}:2", force=True, noprune=True)
    pulled = docker_client.images.pull(name, tag="champion", auth_config=registry.auth_config)
    assert f"{name}@{v2}" in pulled.attrs["RepoDigests"]
    docker_client.images.remove(f"{name}:champion", force=True, noprune=True)


def test_delete_tag_never_touches_other_tags(
    registry: RegistryServer, push: Push, client: RegistryClient, repo: str
) -> None:
    v1 = push(repo, "1", b"model version one\n")
    client.tag(repo, "1", "champion")

    # What Distribution itself answers to a DELETE by tag, recorded for whoever reads this.
    raw = web.delete(f"{registry.url}/v2/{repo}/manifests/champion", auth=registry.auth, timeout=10)
    deleted = client.delete_tag(repo, "champion")

    if distribution_major_version() == 2:
        # Distribution 2.x can only delete by digest; a tag in that position is parsed as a
        # digest and refused with a misleading "400 DIGEST_INVALID: provided digest did not
        # match uploaded content". Nothing is deleted, so delete_tag reports False.
        assert raw.status_code == 400
        assert raw.json()["errors"][0]["code"] == "DIGEST_INVALID"
        assert deleted is False
        assert client.manifest_digest(repo, "champion") == v1
    else:
        # Distribution 3 implements OCI 1.1 tag deletion (the raw DELETE already removed it).
        assert raw.status_code == 202
        assert deleted is True
        assert client.manifest_digest(repo, "champion") is None

    # Whatever happened to the alias, the version's tag and manifest are untouched.
    assert client.manifest_digest(repo, "1") == v1
    assert client.get_manifest(repo, v1).digest == v1


def test_wrong_password_is_permanent(registry: RegistryServer, push: Push, repo: str) -> None:
    push(repo, "1", b"model version one\n")
    wrong = "definitely-not-the-password"
    with RegistryClient(registry.host, username=registry.username, password=wrong) as client:
        with pytest.raises(PermanentError) as info:
            client.get_manifest(repo, "1")
        with pytest.raises(PermanentError):
            client.ping()
    message = str(info.value)
    assert message == (
        f"registry {registry.host} denied access to {repo}: UNAUTHORIZED: authentication required"
    )
    assert wrong not in message and wrong not in repr(client)
    assert isinstance(info.value, RegistryPermanentError)
    assert info.value.status_code == 401


def test_missing_manifest_is_permanent(push: Push, client: RegistryClient, repo: str) -> None:
    push(repo, "1", b"model version one\n")
    with pytest.raises(PermanentError) as info:
        client.get_manifest(repo, "no-such-tag")
    assert str(info.value) == f"manifest {repo}:no-such-tag not found"
    assert client.manifest_digest(repo, "no-such-tag") is None

    # A repository that was never pushed answers 404 NAME_UNKNOWN; same outcome.
    with pytest.raises(PermanentError, match="not found"):
        client.get_manifest(f"{repo}-never-pushed", "1")
    with pytest.raises(PermanentError, match="not found"):
        client.tag(repo, "no-such-tag", "champion")
    assert client.manifest_digest(repo, "champion") is None


class Interfering(httpx.BaseTransport):
    """The real transport, except for the ``nth`` chunk PATCH of an upload: it is refused with
    a 503 before a byte is sent (a proxy's hiccup), or its body breaks off after ``cut`` bytes
    (a dropped connection) and the registry keeps what arrived."""

    def __init__(self, nth: int, *, cut: int | None = None) -> None:
        self._inner = httpx.HTTPTransport()
        self._nth, self._cut, self._patches = nth, cut, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            self._patches += 1
            if self._patches == self._nth and self._cut is None:
                return httpx.Response(503, json={"errors": [{"code": "UNAVAILABLE"}]})
            if self._patches == self._nth:
                request = httpx.Request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    stream=self._broken(request),
                )
        return self._inner.handle_request(request)

    def _broken(self, request: httpx.Request) -> httpx.SyncByteStream:
        cut = self._cut or 0

        class Broken(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                sent = 0
                for chunk in request.stream:  # type: ignore[union-attr]
                    yield chunk[: cut - sent]
                    sent += len(chunk)
                    if sent >= cut:
                        raise httpx.WriteError("connection dropped mid-chunk")

        return Broken()

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize(
    "cut",
    [None, 300 << 10],
    ids=["chunk refused, resumed where the registry stands", "chunk cut, new session"],
)
def test_an_interrupted_chunked_upload_completes(
    registry: RegistryServer, repo: str, cut: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Distribution 2.8 answers GET on a session with the range it holds, and forgets a session
    whose chunk broke off (its _state no longer matches): both end in the right blob."""
    data = uuid.uuid4().bytes * (3 << 16)  # 3 MiB
    chunk = 1 << 20
    transport = Interfering(2, cut=cut)
    caplog.set_level("INFO", logger="mlflow_dock.oci.remote")
    with RegistryClient(
        registry.host,
        username=registry.username,
        password=registry.password,
        transport=transport,
        chunk_bytes=chunk,
    ) as client:
        digest = client.upload_blob(repo, io.BytesIO(data))
        with client.open_blob(repo, digest) as blob:
            assert blob.read() == data
    resumed = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    if cut is None:
        # Refused before a byte of it arrived: continued at the second chunk, not from the start.
        assert len(resumed) == 1, resumed
        assert f"resuming at byte {chunk} of {len(data)}" in resumed[0], resumed[0]
    else:
        # Cut mid-chunk: Distribution 2.8 cancels the session when the status GET (or, if the
        # broken chunk's bytes land after that GET, the next PATCH) carries a stale _state,
        # so the upload goes on in a new session from byte 0.
        assert 1 <= len(resumed) <= 2, resumed
        assert f"resuming at byte 0 of {len(data)}" in resumed[-1], resumed
