"""A small OCI Distribution API client: read a manifest, put it under another tag, delete tags.

Moving an MLflow alias (``champion``) must make the alias tag point at exactly the digest of the
version's image, without a Docker Engine and without rebuilding. The only way to guarantee the
same digest is to PUT the very bytes the registry returned for the version's manifest: a
manifest's digest is the sha256 of its bytes, and registries store whatever they are given.

Why hand-written instead of a maintained client such as oras-py: those clients re-serialise
manifests from dicts. oras-py's ``get_manifest`` returns ``response.json()`` and its
``upload_manifest`` takes a dict and sends ``json=manifest`` (its own spacing, and always the
OCI manifest Content-Type). Distribution, for one, serves manifests pretty-printed, so the
re-serialised bytes differ, the alias gets a *new* digest, and anything pinned to the version's
digest no longer matches the alias. Here manifests stay ``bytes`` end to end. (oras-py's
``delete_tag`` also deletes the manifest *by digest*, taking every other tag with it; see
:meth:`RegistryClient.delete_tag` for why this module never does.)

Scope is deliberately small: manifests, plus the few blob operations that registry-side image
assembly needs (:mod:`mlflow_dock.imaging.assembly`: check, upload, mount, read a config, read a
layer as a stream), sync ``httpx.Client``, Basic and Bearer (Docker token) auth as an
``httpx.Auth`` flow (:mod:`mlflow_dock.oci.authflow`, bookkeeping in :mod:`mlflow_dock.oci.auth`),
and every transport error or non-2xx answer translated into :mod:`mlflow_dock.errors` in one
place, :meth:`mlflow_dock.oci.errors.RegistryErrors.error`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import httpx

from mlflow_dock.oci.authflow import RefreshCredentials, RegistryLogin
from mlflow_dock.oci.errors import (
    Op,
    RegistryError,
    RegistryErrors,
    RegistryPermanentError,
    RegistryRetryableError,
    error_entries,
    ref_text,
    upload_session_lost,
)
from mlflow_dock.oci.manifest import MANIFEST_MEDIA_TYPES, OCI_INDEX, Manifest, digest_matches
from mlflow_dock.oci.reference import (
    DOCKER_HUB_API_HOST,
    DOCKER_HUB_HOSTS,
    REPOSITORY_RE,
    TAG_RE,
    is_digest,
    is_loopback,
    split_host,
)
from mlflow_dock.oci.streams import SizedReader

# The errors live in oci.errors (the auth flow raises them too) and are offered here as well,
# beside the client whose operations raise them.
__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "BlobReader",
    "DeleteTag",
    "RegistryClient",
    "RegistryError",
    "RegistryPermanentError",
    "RegistryRetryableError",
]

log = logging.getLogger(__name__)

# Without every type listed, registries may convert (old Distribution downgrades to schema 1)
# or refuse (an index asked for with only image-manifest types): either way a different digest.
_ACCEPT: Final = ", ".join(MANIFEST_MEDIA_TYPES)


# What is read from a file (or a blob stream) at a time: memory stays flat whatever the size.
_UPLOAD_CHUNK: Final = 1 << 20
_BLOB_TYPE: Final = "application/octet-stream"
# Blobs up to this size go up in one PUT; bigger ones as PATCHes of this size (OCI chunked
# upload), so that an interrupted upload resumes where the registry stopped receiving instead of
# starting a multi-GB layer over. ECR wants chunks of at least 5 MiB but the last.
DEFAULT_CHUNK_BYTES: Final = 64 << 20
# Interruptions in a row (no chunk accepted in between) before an upload gives up.
_MAX_RESUMES: Final = 5

# Actions a token must grant per HTTP method. Docker Hub and GHCR challenge each request with
# only what that request needs, so a PUT must ask for push itself rather than reuse a pull token.
_PULL: Final = ("pull",)
_PUSH: Final = ("pull", "push")
_DELETE: Final = ("pull", "push", "delete")


DeleteTag = Callable[[str, str], bool]
"""How one tag is removed from a repository, and nothing else: ``(repository, tag)`` -> True
when the tag is gone (also when it already was), False when the registry cannot remove a tag
without its manifest. The default is OCI 1.1's ``DELETE`` by tag; ECR's is its own API
(``cloud.ecr.EcrRepositories.delete_tag``), chosen in ``app.py``."""


# A request body: bytes, or a factory of chunks so that a file is streamed rather than read
# into memory, and streamed again from its start if a challenge makes us resend the request.
_Content = bytes | Callable[[], Iterable[bytes]] | None


class _Replayable:
    """A streamed request body that starts over each time it is sent.

    httpx streams a plain iterable (not a generator) afresh on every iteration, so the auth flow
    can send the same request again after a 401 without reading a large blob into memory.
    """

    def __init__(self, chunks: Callable[[], Iterable[bytes]]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks())


def _file_chunks(
    data: IO[bytes] | Path, start: int, end: int | None = None
) -> Callable[[], Iterator[bytes]]:
    """Chunks of ``data`` from ``start`` (to ``end``, else its end), read afresh per call."""

    def read(file: IO[bytes]) -> Iterator[bytes]:
        file.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            chunk = file.read(_UPLOAD_CHUNK if left is None else min(_UPLOAD_CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk

    def chunks() -> Iterator[bytes]:
        if isinstance(data, Path):
            with data.open("rb") as file:
                yield from read(file)
        else:
            yield from read(data)

    return chunks


def _blob_digest_and_size(data: IO[bytes] | Path, start: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in _file_chunks(data, start)():
        digest.update(chunk)
        size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


# --------------------------------------------------------------------------- client


class RegistryClient:
    """Manifest operations against one registry host.

    Tokens are cached per (realm, service, scope) on the instance (its `RegistryLogin`), so
    reuse one client for a job's requests. Sharing an instance across threads is safe but may
    fetch a token twice.
    """

    def __init__(
        self,
        host: str,
        *,
        username: str | None = None,
        password: str | None = None,
        scheme: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        on_blob: Callable[[str, int], None] | None = None,
        refresh_credentials: RefreshCredentials | None = None,
        delete_tag: DeleteTag | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # None: OCI's DELETE by tag (`_oci_delete_tag`).
        self._delete_tag = delete_tag
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self._chunk_bytes = chunk_bytes
        host = host.strip()
        if "://" in host:
            # Accept "https://ghcr.io" from settings; an explicit scheme argument still wins.
            given_scheme, _, host = host.partition("://")
            scheme = scheme or given_scheme.lower()
        host = host.rstrip("/")
        if "@" in host:
            # Not echoed: "user:password@host" would put the password in the message.
            raise ValueError("invalid registry host: credentials belong in username/password")
        if not host or "/" in host:
            raise ValueError(f"invalid registry host {host!r}: expected HOST[:PORT]")
        hostname, port = split_host(host)
        if scheme is None:
            # Docker's rule for insecure registries: loopback speaks plain HTTP by default.
            scheme = "http" if is_loopback(hostname) else "https"
        if scheme not in {"http", "https"}:
            raise ValueError(f"invalid registry scheme {scheme!r}: expected http or https")
        self.host = host
        self.is_docker_hub = port is None and hostname.lower() in DOCKER_HUB_HOSTS
        if self.is_docker_hub:
            api_netloc = DOCKER_HUB_API_HOST
        else:
            bracketed = f"[{hostname}]" if ":" in hostname else hostname
            api_netloc = bracketed if port is None else f"{bracketed}:{port}"
        self.scheme = scheme
        self.base_url = f"{scheme}://{api_netloc}"
        # Told ("uploaded" | "mounted" | "present", size) per blob, for transfer metrics.
        self._on_blob = on_blob or (lambda _outcome, _size: None)
        # Asked once per client for a fresh (username, password) when the registry still
        # answers 401 with ours: a cloud token can be revoked or expire mid-job.
        self._login = RegistryLogin(
            username=username, password=password, scheme=scheme, refresh=refresh_credentials
        )
        self._errors = RegistryErrors(self.host, self._login)
        self._http = httpx.Client(
            transport=transport,
            # A context shared by the caller's clients: httpx otherwise loads the CA bundle for
            # every client, ~160 ms of CPU, most of an alias job's time (a client per job).
            verify=ssl_context if ssl_context is not None else True,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": "mlflow-dock"},
        )

    def __repr__(self) -> str:
        return (
            f"RegistryClient(host={self.host!r}, base_url={self.base_url!r}, "
            f"username={self.username!r})"
        )

    @property
    def username(self) -> str | None:
        """Who the client logs in as (after a credential refresh, the new name)."""
        return self._login.username

    # ------------------------------------------------------------------ public API

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        repository = self._repository(repository)
        self._check_reference(reference)
        op = Op(
            f"getting manifest {ref_text(repository, reference)}",
            repository,
            reference,
            kind="get_manifest",
        )
        response = self._send(
            "GET", self._manifest_path(repository, reference), op, _PULL, {"Accept": _ACCEPT}
        )
        if response.status_code != 200:
            raise self._errors.error(op, response=response)
        body = response.content
        manifest = Manifest.from_bytes(body, self._media_type(response, op))
        # Both checks guard the one property this module exists for: the digest we PUT later
        # is the digest the registry holds for the source reference.
        served = response.headers.get("Docker-Content-Digest")
        if served and digest_matches(body, served) is False:
            raise self._errors.fail(
                f"registry {self.host} sent manifest {ref_text(repository, reference)} whose "
                f"content digest {manifest.digest} does not match Docker-Content-Digest {served}"
            )
        if ":" in reference and digest_matches(body, reference) is False:
            raise self._errors.fail(
                f"registry {self.host} sent manifest {ref_text(repository, reference)} whose "
                f"content digest is {manifest.digest}"
            )
        return manifest

    def put_manifest(self, repository: str, tag: str, manifest: Manifest) -> str:
        """PUT ``manifest.body`` byte for byte under ``tag``; returns the manifest's digest.

        ``tag`` may also be the manifest's own digest, which stores it untagged (see
        :meth:`put_manifest_by_digest`).
        """
        repository = self._repository(repository)
        self._check_reference(tag)
        if ":" in tag and digest_matches(manifest.body, tag) is False:
            raise self._errors.fail(
                f"cannot put manifest {manifest.digest} under another digest {tag} in {repository}"
            )
        op = Op(f"putting manifest {ref_text(repository, tag)}", repository, tag)
        response = self._send(
            "PUT",
            self._manifest_path(repository, tag),
            op,
            _PUSH,
            {"Content-Type": manifest.media_type},
            manifest.body,
        )
        if response.status_code not in {200, 201, 202, 204}:
            raise self._errors.error(op, response=response)
        stored = response.headers.get("Docker-Content-Digest")
        if stored and digest_matches(manifest.body, stored) is False:
            raise self._errors.fail(
                f"registry {self.host} stored {ref_text(repository, tag)} as {stored}, "
                f"not as the {manifest.digest} that was sent"
            )
        return manifest.digest

    def put_manifest_by_digest(self, repository: str, manifest: Manifest) -> str:
        """Store ``manifest`` without a tag (``PUT /v2/<repo>/manifests/<digest>``).

        It can then be pulled and tested by digest before any tag points users at it. Note that a
        registry garbage collection run with untagged-manifest deletion may remove it meanwhile.
        """
        return self.put_manifest(repository, manifest.digest, manifest)

    def tag(self, repository: str, source_reference: str, tag: str) -> str:
        """Point ``tag`` at the manifest of ``source_reference``; returns the digest."""
        manifest = self.get_manifest(repository, source_reference)
        return self.put_manifest(repository, tag, manifest)

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest ``reference`` points at (HEAD), or None if the registry has no such tag."""
        repository = self._repository(repository)
        self._check_reference(reference)
        op = Op(f"checking manifest {ref_text(repository, reference)}", repository, reference)
        response = self._send(
            "HEAD", self._manifest_path(repository, reference), op, _PULL, {"Accept": _ACCEPT}
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._errors.error(op, response=response)
        digest: str = response.headers.get("Docker-Content-Digest", "")
        if digest:
            return digest
        # The header is only a SHOULD for HEAD; the body's digest is authoritative anyway.
        try:
            return self.get_manifest(repository, reference).digest
        except RegistryPermanentError as exc:
            if exc.status_code == 404:
                return None
            raise

    def referrers(self, repository: str, digest: str) -> bytes | None:
        """The OCI 1.1 referrers index of ``digest`` (``GET /v2/<name>/referrers/<digest>``).

        None when the registry has no referrers API: the spec forbids a 404 from registries
        that have it, and Distribution 2.x answers 404 (some others 405, or a non-index body).
        Clients then use the tag schema, an index tagged ``sha256-<hex>`` (oci.referrers).
        """
        repository = self._repository(repository)
        self._check_digest(digest)
        op = Op(f"listing referrers of {repository}@{digest}", repository, digest)
        response = self._send(
            "GET", f"/v2/{repository}/referrers/{digest}", op, _PULL, {"Accept": OCI_INDEX}
        )
        if response.status_code in {404, 405}:
            return None
        if response.status_code != 200:
            raise self._errors.error(op, response=response)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != OCI_INDEX:
            return None
        return response.content

    def delete_tag(self, repository: str, tag: str) -> bool:
        """Remove ``tag`` only (OCI 1.1 ``DELETE /v2/<repo>/manifests/<tag>``, or the
        registry's own API where the client was given one: see :data:`DeleteTag`).

        True when the tag no longer exists: deleted now, or already gone (a retry of a job
        that deleted it before crashing must not fail). False when the registry cannot delete
        by tag (400, 405 or UNSUPPORTED; Distribution 2.x answers 400 DIGEST_INVALID): the tag
        is still there and the caller records why. Never falls back to deleting by digest,
        since that deletes the manifest for every other tag that points at it.
        """
        repository = self._repository(repository)
        if not TAG_RE.fullmatch(tag):
            raise self._errors.fail(f"invalid tag {tag!r} for {repository}")
        if self._delete_tag is not None:
            return self._delete_tag(repository, tag)
        return self._oci_delete_tag(repository, tag)

    def _oci_delete_tag(self, repository: str, tag: str) -> bool:
        op = Op(f"deleting tag {ref_text(repository, tag)}", repository, tag)
        response = self._send("DELETE", self._manifest_path(repository, tag), op, _DELETE)
        status = response.status_code
        if status in {200, 202, 204}:
            return True
        entries = error_entries(response)
        if status in {400, 405} or any(code == "UNSUPPORTED" for code, _ in entries):
            log.info(
                "registry %s cannot delete tag %s: %s",
                self.host,
                ref_text(repository, tag),
                self._errors.redact(self._errors.detail(response)),
            )
            return False
        if status == 404:
            # 404 means "no such tag" on registries that delete by tag, but may also mean
            # "no such route" elsewhere; only the tag's presence tells which.
            return self.manifest_digest(repository, tag) is None
        raise self._errors.error(op, response=response)

    # ------------------------------------------------------------------ blobs

    def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether ``repository`` holds blob ``digest`` (HEAD)."""
        repository = self._repository(repository)
        self._check_digest(digest)
        return self._blob_exists(repository, digest, _PULL)

    def get_blob(self, repository: str, digest: str) -> bytes:
        """The blob's bytes, verified against ``digest``; for small blobs such as image configs.

        Redirects are followed (registries serve blobs from object storage or a CDN); httpx
        drops our Authorization header when a redirect leaves the registry's origin.
        """
        repository = self._repository(repository)
        self._check_digest(digest)
        op = Op(f"getting blob {repository}@{digest}", repository, digest, kind="get_blob")
        response = self._send("GET", self._blob_path(repository, digest), op, _PULL)
        if response.status_code != 200:
            raise self._errors.error(op, response=response)
        body = response.content
        if digest_matches(body, digest) is False:
            raise self._errors.fail(
                f"registry {self.host} sent blob {repository}@{digest} whose content digest is "
                f"{Manifest.digest_of(body)}"
            )
        return body

    def open_blob(self, repository: str, digest: str, size: int | None = None) -> BlobReader:
        """Blob ``digest`` as a seekable, read-only file, streamed: never held in memory.

        For layers (a model's weights, a base layer copied across registries): bytes are read
        as they are asked for, a seek starts a ranged GET at the new position. Read front to
        back, the content is checked against ``digest`` at its end. ``size`` (from the layer
        descriptor) saves a HEAD. Close it (or use it as a context manager).
        """
        repository = self._repository(repository)
        self._check_digest(digest)
        if size is None:
            op = Op(f"checking blob {repository}@{digest}", repository, digest, kind="get_blob")
            response = self._send("HEAD", self._blob_path(repository, digest), op, _PULL)
            if response.status_code != 200:
                raise self._errors.error(op, response=response)
            size = int(response.headers.get("Content-Length", "-1"))
            if size < 0:
                raise self._errors.fail(
                    f"registry {self.host} gave no size for blob {repository}@{digest}"
                )
        return BlobReader(self, repository, digest, size)

    def _blob_stream(self, repository: str, digest: str, offset: int) -> httpx.Response:
        """A streamed GET of the blob from ``offset`` (the caller closes it)."""
        op = Op(f"getting blob {repository}@{digest}", repository, digest, kind="get_blob")
        headers = {"Range": f"bytes={offset}-"} if offset else None
        response = self._send(
            "GET", self._blob_path(repository, digest), op, _PULL, headers, stream=True
        )
        if response.status_code in {200, 206}:
            return response
        response.read()
        response.close()
        raise self._errors.error(op, response=response)

    def upload_blob(
        self,
        repository: str,
        data: bytes | IO[bytes] | Path,
        digest: str | None = None,
        *,
        mount_from: str | None = None,
    ) -> str:
        """Make ``repository`` hold ``data`` as a blob; returns its digest.

        Nothing is sent if the blob is already there; with ``mount_from`` (another repository of
        this registry) the registry is first asked to link the blob from there. Otherwise POST
        opens a session; a blob up to the client's ``chunk_bytes`` then goes in one PUT
        ``?digest=``, a bigger one as PATCHes of that size and a final PUT (see
        :meth:`_upload_chunks`: an interrupted chunk resumes where the registry stopped). A file
        (a seekable binary file object, read from its current position, or a path) is streamed,
        never read into memory, and its digest computed in a first pass if not given.
        """
        repository = self._repository(repository)
        content: _Content
        source: IO[bytes] | Path | None = None
        start = 0
        if isinstance(data, bytes):
            actual = Manifest.digest_of(data)
            if digest is not None and digest != actual:
                raise self._errors.fail(
                    f"cannot upload a blob whose digest is {actual} as {digest} to {repository}"
                )
            digest, size, content = actual, len(data), data
        else:
            source = data
            start = 0 if isinstance(data, Path) else data.tell()
            if digest is None:
                digest, size = _blob_digest_and_size(data, start)
            elif isinstance(data, Path):
                size = data.stat().st_size
            else:
                size = data.seek(0, 2) - start
            content = _file_chunks(data, start)
        self._check_digest(digest)
        # Asking for push up front: one token then serves every request of the upload.
        if self._blob_exists(repository, digest, _PUSH):
            self._on_blob("present", size)
            return digest
        op = Op(f"uploading blob {repository}@{digest}", repository, digest)
        location = self._start_upload(repository, digest, mount_from, op)
        if location is None:
            self._on_blob("mounted", size)
            return digest
        if source is not None and size > self._chunk_bytes:
            self._upload_chunks(repository, location, source, start, size, digest, op)
            self._on_blob("uploaded", size)
            return digest
        url = location.copy_add_param("digest", digest)
        headers = {"Content-Type": _BLOB_TYPE, "Content-Length": str(size)}
        response = self._session("PUT", url, op, headers, content)
        if response.status_code not in {201, 204}:
            raise self._errors.error(op, response=response)
        self._check_stored(response, repository, digest)
        self._on_blob("uploaded", size)
        return digest

    def _upload_chunks(
        self,
        repository: str,
        location: httpx.URL,
        source: IO[bytes] | Path,
        start: int,
        size: int,
        digest: str,
        op: Op,
    ) -> None:
        """OCI chunked upload: PATCHes with ``Content-Range``, then PUT ``?digest=``.

        After an interrupted PATCH (a transport error or a retryable status), GET on the
        session says how much arrived (``Range: 0-<last>``) and where to go on; the upload
        continues from there. A session the registry no longer knows, or refuses as invalid
        (on the GET, a later PATCH or the final PUT), starts over. Progress is this client's
        own count: ECR's PATCH answers are known to report a stale ``Range``.
        """
        offset = 0
        interruptions = 0
        while True:
            failure: RegistryError
            try:
                if offset < size:
                    location = self._patch_chunk(location, source, start, offset, size, op)
                    offset, interruptions = min(offset + self._chunk_bytes, size), 0
                    continue
                self._finish_upload(location, repository, digest, op)
                return
            except RegistryError as exc:
                if not (isinstance(exc, RegistryRetryableError) or upload_session_lost(exc)):
                    raise
                failure = exc
            interruptions += 1
            if interruptions > _MAX_RESUMES:
                raise failure
            resumed = None if upload_session_lost(failure) else self._upload_status(location, op)
            if resumed is None:
                # The registry forgot the session (or never kept partial uploads): start over.
                fresh = self._start_upload(repository, digest, None, op)
                assert fresh is not None  # no mount was asked for
                location, offset = fresh, 0
            else:
                location, offset = resumed
            log.info(
                "upload of %s@%s interrupted (%s); resuming at byte %d of %d",
                repository,
                digest,
                failure,
                offset,
                size,
            )

    def _patch_chunk(
        self,
        location: httpx.URL,
        source: IO[bytes] | Path,
        start: int,
        offset: int,
        size: int,
        op: Op,
    ) -> httpx.URL:
        """PATCH the chunk at ``offset``; returns where the session goes on."""
        end = min(offset + self._chunk_bytes, size)
        headers = {
            "Content-Type": _BLOB_TYPE,
            "Content-Length": str(end - offset),
            "Content-Range": f"{offset}-{end - 1}",
        }
        body = _file_chunks(source, start + offset, start + end)
        response = self._session("PATCH", location, op, headers, body)
        if response.status_code != 202:
            raise self._errors.error(op, response=response)
        return self._next_location(location, response)

    def _finish_upload(self, location: httpx.URL, repository: str, digest: str, op: Op) -> None:
        response = self._session(
            "PUT",
            location.copy_add_param("digest", digest),
            op,
            {"Content-Type": _BLOB_TYPE, "Content-Length": "0"},
            b"",
        )
        if response.status_code not in {201, 204}:
            raise self._errors.error(op, response=response)
        self._check_stored(response, repository, digest)

    def _upload_status(self, location: httpx.URL, op: Op) -> tuple[httpx.URL, int] | None:
        """(where to continue, bytes received) of an upload session; None if it is gone."""
        try:
            response = self._session("GET", location, op)
        except RegistryRetryableError:
            return None
        if response.status_code != 204:
            return None
        received = 0
        first, _, last = response.headers.get("Range", "").removeprefix("bytes=").partition("-")
        if first == "0" and last.isdigit() and int(last) > 0:
            # "0-0" is ambiguous (Distribution says it for nothing received); 0 is the safe side.
            received = int(last) + 1
        return self._next_location(location, response), received

    def _next_location(self, current: httpx.URL, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("Location")
        # Relative on some registries (GHCR, ACR), absolute on others; Distribution moves its
        # signed _state with every answer, so the newest Location is the one to use.
        return current.join(location) if location else current

    def _session(
        self,
        method: str,
        url: httpx.URL,
        op: Op,
        headers: Mapping[str, str] | None = None,
        content: _Content = None,
    ) -> httpx.Response:
        """A request to an upload session's URL."""
        if _origin(url) == _origin(httpx.URL(self.base_url)):
            return self._send(method, str(url), op, _PUSH, headers, content)
        # An upload session elsewhere (object storage) gets the data, not our credentials.
        return self._request(method, str(url), op, headers, content, None)

    def _check_stored(self, response: httpx.Response, repository: str, digest: str) -> None:
        stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise self._errors.fail(
                f"registry {self.host} stored blob {repository}@{digest} as {stored}"
            )

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Link blob ``digest`` from ``from_repository`` into ``repository`` without copying.

        True if the blob is now in ``repository``; False if the registry declined (it may not
        mount, or we may not read ``from_repository``), in which case the caller uploads it.
        """
        repository = self._repository(repository)
        self._check_digest(digest)
        op = Op(f"mounting blob {digest} into {repository}", repository, digest)
        location = self._start_upload(repository, digest, from_repository, op)
        if location is None:
            return True
        # The registry opened a regular upload session instead; do not leave it dangling.
        if _origin(location) == _origin(httpx.URL(self.base_url)):
            try:
                self._send("DELETE", str(location), op, _PUSH)
            except RegistryError as exc:
                log.info("could not cancel upload session in %s: %s", repository, exc)
        return False

    def ping(self) -> None:
        """Check the registry speaks the v2 API and accepts our credentials."""
        op = Op("checking /v2/")
        response = self._send("GET", "/v2/", op, ())
        if response.status_code != 200:
            raise self._errors.error(op, response=response)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def _repository(self, repository: str) -> str:
        repository = repository.strip("/")
        if self.is_docker_hub and "/" not in repository:
            # Docker Hub keeps official images under library/, as `docker pull python` does.
            repository = f"library/{repository}"
        if not REPOSITORY_RE.fullmatch(repository):
            raise self._errors.fail(
                f"invalid repository name {repository!r} for registry {self.host}"
            )
        return repository

    def _check_reference(self, reference: str) -> None:
        if not (TAG_RE.fullmatch(reference) or is_digest(reference)):
            raise self._errors.fail(f"invalid tag or digest {reference!r}")

    def _check_digest(self, digest: str) -> None:
        if not is_digest(digest):
            raise self._errors.fail(f"invalid digest {digest!r}")

    @staticmethod
    def _manifest_path(repository: str, reference: str) -> str:
        return f"/v2/{repository}/manifests/{reference}"

    @staticmethod
    def _blob_path(repository: str, digest: str) -> str:
        return f"/v2/{repository}/blobs/{digest}"

    def _blob_exists(self, repository: str, digest: str, actions: tuple[str, ...]) -> bool:
        op = Op(f"checking blob {repository}@{digest}", repository, digest)
        response = self._send("HEAD", self._blob_path(repository, digest), op, actions)
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._errors.error(op, response=response)

    def _start_upload(
        self, repository: str, digest: str, mount_from: str | None, op: Op
    ) -> httpx.URL | None:
        """POST an upload session: its absolute URL, or None if the blob was mounted."""
        path = f"/v2/{repository}/blobs/uploads/"
        extra_scope = None
        if mount_from is not None:
            mount_from = self._repository(mount_from)
            path += "?" + str(httpx.QueryParams({"mount": digest, "from": mount_from}))
            # Token registries mount only with pull access to the source repository.
            extra_scope = f"repository:{mount_from}:pull"
        response = self._send("POST", path, op, _PUSH, extra_scope=extra_scope)
        if response.status_code == 201 and mount_from is not None:
            return None
        location = response.headers.get("Location")
        if response.status_code != 202 or not location:
            if response.status_code == 202:
                raise self._errors.fail(f"registry {self.host} opened an upload without a Location")
            raise self._errors.error(op, response=response)
        # Relative on some registries (GHCR, ACR), absolute on others (Distribution, Hub).
        return httpx.URL(self.base_url + path).join(location)

    def _media_type(self, response: httpx.Response, op: Op) -> str:
        content_type: str = response.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type.lower() in MANIFEST_MEDIA_TYPES:
            return content_type
        # Some registries answer with application/json or nothing; the PUT must then carry
        # the manifest's own mediaType or the registry parses it as the wrong kind.
        try:
            declared: object = json.loads(response.content).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
        if isinstance(declared, str) and declared:
            return declared
        if content_type:
            return content_type
        raise self._errors.fail(f"registry {self.host} sent no media type while {op.doing}")

    def _send(
        self,
        method: str,
        path: str,
        op: Op,
        actions: tuple[str, ...],
        headers: Mapping[str, str] | None = None,
        content: _Content = None,
        *,
        extra_scope: str | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One request to the registry, authenticated by its login's auth flow.

        ``path`` is relative to the registry, or an absolute URL of its own origin (an upload
        session's Location). ``actions`` are what a token must grant on ``op.repository``.
        ``stream``: the body is not read (the caller reads and closes the response).
        """
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        auth = self._login.flow(op, self._errors, actions, extra_scope=extra_scope)
        return self._request(method, url, op, headers, content, auth, stream=stream)

    def _request(
        self,
        method: str,
        url: str,
        op: Op,
        headers: Mapping[str, str] | None,
        content: _Content,
        auth: httpx.Auth | None,
        *,
        stream: bool = False,
    ) -> httpx.Response:
        """Send one request (``auth`` None: no credentials at all) and translate failures."""
        request = self._http.build_request(
            method,
            url,
            headers=headers,
            content=_Replayable(content) if callable(content) else content,
        )
        try:
            return self._http.send(
                request,
                auth=auth,
                # Manifests and tokens may be served from a CDN; httpx drops Authorization on
                # redirects to another origin. Writes must not be replayed elsewhere.
                follow_redirects=method in {"GET", "HEAD"},
                stream=stream,
            )
        except httpx.HTTPError as exc:
            raise self._errors.error(op, exc=exc) from exc


class BlobReader(SizedReader):
    """A registry blob as a seekable read-only file (:meth:`RegistryClient.open_blob`).

    One streamed GET serves reads front to back; a seek elsewhere closes it and the next read
    opens a ranged one (``Range: bytes=<offset>-``; a registry that ignores the range and sends
    the whole blob is read up to the offset and that part dropped). Read front to back, the
    bytes are hashed and checked against the digest when the end is reached, so a layer copied
    or scanned through this never trusts content that is not the blob's.
    """

    def __init__(self, client: RegistryClient, repository: str, digest: str, size: int) -> None:
        super().__init__(size)
        self._client = client
        self._repository = repository
        self._digest = digest
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = b""
        self._hash: hashlib._Hash | None = hashlib.sha256()  # None once the reads skip around

    def _moved(self, position: int) -> None:
        self._drop_stream()
        self._hash = None

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self.size - self._position)
        if wanted <= 0:
            return 0
        while not self._pending:
            self._pending = self._next_chunk()
        data, self._pending = self._pending[:wanted], self._pending[wanted:]
        view = memoryview(buffer)
        view[: len(data)] = data
        self._position += len(data)
        if self._hash is not None:
            self._hash.update(data)
            if self._position == self.size:
                self._verify()
        return len(data)

    def close(self) -> None:
        self._drop_stream()
        super().close()

    def _next_chunk(self) -> bytes:
        errors = self._client._errors
        op = Op(
            f"getting blob {self._repository}@{self._digest}",
            self._repository,
            self._digest,
            kind="get_blob",
        )
        if self._chunks is None:
            response = self._client._blob_stream(self._repository, self._digest, self._position)
            self._response = response
            self._chunks = response.iter_bytes(_UPLOAD_CHUNK)
            if self._position and response.status_code == 200:
                rest = self._skip(self._position)
                if rest:
                    return rest
        try:
            chunk = next(self._chunks, b"")
        except httpx.HTTPError as exc:
            self._drop_stream()
            raise errors.error(op, exc=exc) from exc
        if not chunk:
            self._drop_stream()
            raise errors.fail(
                f"registry {self._client.host} ended blob {self._repository}@{self._digest} "
                f"at byte {self._position} of {self.size}",
                retryable=True,
            )
        return chunk

    def _skip(self, count: int) -> bytes:
        """Drop the first ``count`` bytes of a response that ignored the Range header; what
        the last chunk read holds beyond them."""
        assert self._chunks is not None
        while count > 0:
            chunk = next(self._chunks, b"")
            if len(chunk) >= count or not chunk:
                return chunk[count:]
            count -= len(chunk)
        return b""

    def _verify(self) -> None:
        assert self._hash is not None
        actual = "sha256:" + self._hash.hexdigest()
        if self._digest.startswith("sha256:") and actual != self._digest:
            raise self._client._errors.fail(
                f"registry {self._client.host} sent blob {self._repository}@{self._digest} "
                f"whose content digest is {actual}"
            )

    def _drop_stream(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response, self._chunks, self._pending = None, None, b""
