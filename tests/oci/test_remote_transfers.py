"""The registry client's blob transfers: the hook (`on_blob`) that feeds the bytes-uploaded/
mounted metrics, chunked uploads that resume after an interruption, and blobs read as streams."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import httpx
import pytest

from mlflow_dock.errors import PermanentError, RetryableError
from mlflow_dock.oci.remote import RegistryClient
from support.registry import OciRegistry
from support.registry import sha256 as sha

REPO = "team/iris"


def client(registry: OciRegistry, seen: list[tuple[str, int]]) -> RegistryClient:
    return registry.client(on_blob=lambda outcome, size: seen.append((outcome, size)))


def test_uploaded_then_present():
    seen: list[tuple[str, int]] = []
    registry = OciRegistry()
    data = b"model layer bytes" * 10
    with client(registry, seen) as c:
        c.upload_blob(REPO, data)
        c.upload_blob(REPO, data)  # already there: nothing sent
    assert seen == [("uploaded", len(data)), ("present", len(data))]


def test_mounted_from_another_repository():
    seen: list[tuple[str, int]] = []
    registry = OciRegistry()
    data = b"shared runtime layer"
    registry.put_blob("team/other", data)
    with client(registry, seen) as c:
        digest = c.upload_blob(REPO, data, mount_from="team/other")
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert seen == [("mounted", len(data))]


def test_without_a_hook_nothing_changes():
    registry = OciRegistry()
    with registry.client() as c:
        c.upload_blob(REPO, b"x" * 5)
    assert len(registry.blobs) == 1


# --------------------------------------------------------------------------- big blobs


CHUNK = 64 << 10


class CountingFile(io.BytesIO):
    """A seekable file that remembers the most it ever handed out in one read."""

    largest_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        CountingFile.largest_read = max(CountingFile.largest_read, len(data))
        return data


def patches(registry: OciRegistry) -> list[str]:
    return [
        str(e.request.headers.get("Content-Range"))
        for e in registry.log
        if e.request.method == "PATCH" and e.response.status_code == 202
    ]


def test_a_blob_bigger_than_a_chunk_goes_up_in_ranged_patches_then_one_put(tmp_path: Path):
    registry = OciRegistry()
    data = os.urandom(3 * CHUNK + 100)
    path = tmp_path / "layer"
    path.write_bytes(data)
    with registry.client(chunk_bytes=CHUNK) as c:
        digest = c.upload_blob(REPO, path, sha(data))
    assert registry.blobs[(REPO, digest)] == data
    assert patches(registry) == [
        f"0-{CHUNK - 1}",
        f"{CHUNK}-{2 * CHUNK - 1}",
        f"{2 * CHUNK}-{3 * CHUNK - 1}",
        f"{3 * CHUNK}-{3 * CHUNK + 99}",
    ]
    put = registry.log[-1].request
    assert (put.method, put.url.params["digest"], put.content) == ("PUT", digest, b"")
    # Blobs up to a chunk still take one PUT.
    with registry.client(chunk_bytes=CHUNK) as c:
        c.upload_blob(REPO, io.BytesIO(data[:CHUNK]))
    assert [e.request.method for e in registry.log[-3:]] == ["HEAD", "POST", "PUT"]


def test_an_upload_cut_mid_chunk_resumes_where_the_registry_stopped_receiving():
    registry = OciRegistry()
    data = os.urandom(3 * CHUNK)
    registry.cut_next_patch(after=1000)  # the first chunk breaks off after 1000 bytes
    with registry.client(chunk_bytes=CHUNK) as c:
        digest = c.upload_blob(REPO, io.BytesIO(data))
    assert registry.blobs[(REPO, digest)] == data
    statuses = [e for e in registry.log if e.request.method == "GET" and e.route.kind == "upload"]
    assert [e.response.headers["Range"] for e in statuses] == ["0-999"]
    # The rest of the interrupted chunk starts at byte 1000, not at 0: nothing sent twice.
    assert patches(registry)[0].startswith("1000-")
    assert len([e for e in registry.log if e.request.method == "POST"]) == 1


def test_a_chunk_the_registry_refused_for_a_while_is_sent_again():
    registry = OciRegistry()
    data = os.urandom(2 * CHUNK + 1)
    registry.fail_next("PATCH", "upload", 503)
    registry.fail_next("PATCH", "upload", 502)
    with registry.client(chunk_bytes=CHUNK) as c:
        digest = c.upload_blob(REPO, io.BytesIO(data))
    assert registry.blobs[(REPO, digest)] == data
    assert patches(registry) == [
        f"0-{CHUNK - 1}",
        f"{CHUNK}-{2 * CHUNK - 1}",
        f"{2 * CHUNK}-{2 * CHUNK}",
    ]


def test_a_session_the_registry_lost_starts_over_and_a_dead_one_gives_up():
    registry = OciRegistry()
    data = os.urandom(2 * CHUNK)
    registry.cut_next_patch(after=10)
    registry.fail_next("GET", "upload", 404)  # as Distribution 2.x after a partial chunk
    with registry.client(chunk_bytes=CHUNK) as c:
        digest = c.upload_blob(REPO, io.BytesIO(data))
    assert registry.blobs[(REPO, digest)] == data
    assert len([e for e in registry.log if e.request.method == "POST"]) == 2

    registry.faults[("PATCH", "upload")] = 503
    before = len(registry.log)
    with registry.client(chunk_bytes=CHUNK) as c, pytest.raises(RetryableError, match="503"):
        c.upload_blob(REPO, io.BytesIO(os.urandom(2 * CHUNK)))
    # The first try and five resumptions, each after asking the session where it stands.
    methods = [e.request.method for e in registry.log[before:]]
    assert (methods.count("PATCH"), methods.count("GET")) == (6, 5)


def test_a_session_refused_after_its_status_was_read_starts_over():
    """The race CI met on Distribution 2.8: a broken-off chunk's bytes land after the status GET,
    so the next PATCH carries a stale _state and is answered 404 BLOB_UPLOAD_INVALID."""
    registry = OciRegistry()
    data = os.urandom(3 * CHUNK)
    registry.cut_next_patch(after=1000, late=True)
    with registry.client(chunk_bytes=CHUNK) as c:
        digest = c.upload_blob(REPO, io.BytesIO(data))
    assert registry.blobs[(REPO, digest)] == data
    refused = [
        e for e in registry.log if e.route.kind == "upload" and e.response.status_code == 404
    ]
    assert [e.request.method for e in refused] == ["PATCH"]
    assert len([e for e in registry.log if e.request.method == "POST"]) == 2
    # The new session starts from byte 0: the lost one's bytes are not trusted.
    assert patches(registry)[-3:] == [
        f"0-{CHUNK - 1}",
        f"{CHUNK}-{2 * CHUNK - 1}",
        f"{2 * CHUNK}-{3 * CHUNK - 1}",
    ]


def test_a_final_put_on_a_lost_session_uploads_again():
    registry = OciRegistry()
    data = os.urandom(2 * CHUNK)
    calls = 0

    def lose_the_session(request: httpx.Request) -> httpx.Response | None:
        nonlocal calls
        if request.method == "PUT" and "/blobs/uploads/" in request.url.path:
            calls += 1
            if calls == 1:
                registry.sessions.clear()  # expired, as a registry's upload purger would
        return None

    registry.intercept = lose_the_session
    with registry.client(chunk_bytes=CHUNK) as c:
        digest = c.upload_blob(REPO, io.BytesIO(data))
    assert registry.blobs[(REPO, digest)] == data
    assert calls == 2
    assert len([e for e in registry.log if e.request.method == "POST"]) == 2


def test_a_refused_chunk_is_not_retried():
    registry = OciRegistry()
    registry.faults[("PATCH", "upload")] = 403
    with registry.client(chunk_bytes=CHUNK) as c, pytest.raises(PermanentError, match="denied"):
        c.upload_blob(REPO, io.BytesIO(os.urandom(2 * CHUNK)))
    assert [e.request.method for e in registry.log].count("PATCH") == 1


def test_uploads_read_a_file_a_mebibyte_at_a_time():
    registry = OciRegistry()
    data = os.urandom(5 << 20)
    CountingFile.largest_read = 0
    with registry.client(chunk_bytes=2 << 20) as c:
        c.upload_blob(REPO, CountingFile(data))
    assert registry.blobs[(REPO, sha(data))] == data
    assert CountingFile.largest_read == 1 << 20


# --------------------------------------------------------------------------- reading blobs


def test_open_blob_streams_seeks_with_ranges_and_checks_the_digest():
    registry = OciRegistry(redirect_blobs=True)
    data = os.urandom(3 << 20)
    digest = registry.put_blob(REPO, data)
    with registry.client() as c:
        with c.open_blob(REPO, digest) as blob:
            assert blob.size == len(data)
            assert blob.read() == data
        with c.open_blob(REPO, digest, size=len(data)) as blob:
            blob.seek(len(data) - 10)
            assert blob.read() == data[-10:]
        # The last byte flipped: a fixed replacement was no change when the random byte was it.
        registry.blobs[(REPO, digest)] = data[:-1] + bytes([data[-1] ^ 0xFF])
        with c.open_blob(REPO, digest) as blob, pytest.raises(PermanentError, match="digest"):
            blob.read()
    ranged = [e for e in registry.log if e.response.status_code == 206]
    assert [e.request.headers["Range"] for e in ranged] == [f"bytes={len(data) - 10}-"]


def test_open_blob_on_a_registry_that_ignores_ranges_drops_what_it_skips():
    registry = OciRegistry(blob_ranges=False)
    data = os.urandom(1 << 20)
    digest = registry.put_blob(REPO, data)
    with registry.client() as c, c.open_blob(REPO, digest) as blob:
        blob.seek(1000)
        assert blob.read(5) == data[1000:1005]
        with pytest.raises(PermanentError, match="not found"):
            c.open_blob(REPO, sha(b"missing")).read()


def test_a_blob_copied_between_registries_streams_through_chunks():
    source, target = OciRegistry("source.example.com"), OciRegistry()
    data = os.urandom(3 * CHUNK + 7)
    digest = source.put_blob("library/python", data)
    with (
        source.client() as s,
        target.client(chunk_bytes=CHUNK) as t,
        s.open_blob("library/python", digest) as blob,
    ):
        t.upload_blob(REPO, blob, digest)
    assert target.blobs[(REPO, digest)] == data
