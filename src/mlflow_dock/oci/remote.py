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
assembly needs (:mod:`mlflow_dock.build.assembly`: check, upload, mount, read a config), sync
``httpx.Client``, Basic and Bearer (Docker token) auth (:mod:`mlflow_dock.oci.auth`), and every
transport error or non-2xx answer translated into :mod:`mlflow_dock.errors` in one place,
:meth:`RegistryClient._error`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import httpx

from mlflow_dock.errors import JobError, PermanentError, RetryableError
from mlflow_dock.oci.auth import RegistryAuth
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

__all__ = [
    "RegistryClient",
    "RegistryError",
    "RegistryPermanentError",
    "RegistryRetryableError",
]

log = logging.getLogger(__name__)

# Without every type listed, registries may convert (old Distribution downgrades to schema 1)
# or refuse (an index asked for with only image-manifest types): either way a different digest.
_ACCEPT: Final = ", ".join(MANIFEST_MEDIA_TYPES)


_UPLOAD_CHUNK: Final = 1 << 20
_BLOB_TYPE: Final = "application/octet-stream"

_DETAIL_MAX: Final = 300

# Actions a token must grant per HTTP method. Docker Hub and GHCR challenge each request with
# only what that request needs, so a PUT must ask for push itself rather than reuse a pull token.
_PULL: Final = ("pull",)
_PUSH: Final = ("pull", "push")
_DELETE: Final = ("pull", "push", "delete")


# --------------------------------------------------------------------------- errors


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
class _Op:
    """What a request was for, so one function can word every error."""

    doing: str  # "getting manifest team/x:v1"
    repository: str | None = None
    reference: str | None = None
    # "get_manifest"/"get_blob" turn 404 into "manifest/blob ... not found"; "token"
    kind: str = "other"


# A request body: bytes, or a factory of chunks so that a file is streamed rather than read
# into memory, and streamed again from its start if a challenge makes us resend the request.
_Content = bytes | Callable[[], Iterable[bytes]] | None


def _file_chunks(data: IO[bytes] | Path, start: int) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        if isinstance(data, Path):
            with data.open("rb") as file:
                yield from iter(lambda: file.read(_UPLOAD_CHUNK), b"")
        else:
            data.seek(start)
            yield from iter(lambda: data.read(_UPLOAD_CHUNK), b"")

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


def _ref(repository: str, reference: str) -> str:
    sep = "@" if ":" in reference else ":"
    return f"{repository}{sep}{reference}"


def _error_entries(response: httpx.Response) -> list[tuple[str, str]]:
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


def _is_certificate_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        current = current.__cause__ or current.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


# --------------------------------------------------------------------------- client


class RegistryClient:
    """Manifest operations against one registry host.

    Tokens are cached per (realm, service, scope) on the instance, so reuse one client for a
    job's requests. Sharing an instance across threads is safe but may fetch a token twice.
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
        refresh_credentials: Callable[[], tuple[str | None, str | None]] | None = None,
    ) -> None:
        # Asked once per client for a fresh (username, password) when the registry still
        # answers 401 with ours: a cloud token can be revoked or expire mid-job.
        self._refresh_credentials = refresh_credentials
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
        self.username = username
        # Told ("uploaded" | "mounted" | "present", size) per blob, for transfer metrics.
        self._on_blob = on_blob or (lambda _outcome, _size: None)
        self._auth = RegistryAuth(username=username, password=password)
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": "mlflow-dock"},
        )

    def __repr__(self) -> str:
        return (
            f"RegistryClient(host={self.host!r}, base_url={self.base_url!r}, "
            f"username={self.username!r})"
        )

    # ------------------------------------------------------------------ public API

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        repository = self._repository(repository)
        self._check_reference(reference)
        op = _Op(
            f"getting manifest {_ref(repository, reference)}",
            repository,
            reference,
            kind="get_manifest",
        )
        response = self._send(
            "GET", self._manifest_path(repository, reference), op, _PULL, {"Accept": _ACCEPT}
        )
        if response.status_code != 200:
            raise self._error(op, response=response)
        body = response.content
        manifest = Manifest.from_bytes(body, self._media_type(response, op))
        # Both checks guard the one property this module exists for: the digest we PUT later
        # is the digest the registry holds for the source reference.
        served = response.headers.get("Docker-Content-Digest")
        if served and digest_matches(body, served) is False:
            raise self._fail(
                f"registry {self.host} sent manifest {_ref(repository, reference)} whose "
                f"content digest {manifest.digest} does not match Docker-Content-Digest {served}"
            )
        if ":" in reference and digest_matches(body, reference) is False:
            raise self._fail(
                f"registry {self.host} sent manifest {_ref(repository, reference)} whose "
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
            raise self._fail(
                f"cannot put manifest {manifest.digest} under another digest {tag} in {repository}"
            )
        op = _Op(f"putting manifest {_ref(repository, tag)}", repository, tag)
        response = self._send(
            "PUT",
            self._manifest_path(repository, tag),
            op,
            _PUSH,
            {"Content-Type": manifest.media_type},
            manifest.body,
        )
        if response.status_code not in {200, 201, 202, 204}:
            raise self._error(op, response=response)
        stored = response.headers.get("Docker-Content-Digest")
        if stored and digest_matches(manifest.body, stored) is False:
            raise self._fail(
                f"registry {self.host} stored {_ref(repository, tag)} as {stored}, "
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
        op = _Op(f"checking manifest {_ref(repository, reference)}", repository, reference)
        response = self._send(
            "HEAD", self._manifest_path(repository, reference), op, _PULL, {"Accept": _ACCEPT}
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._error(op, response=response)
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
        op = _Op(f"listing referrers of {repository}@{digest}", repository, digest)
        response = self._send(
            "GET", f"/v2/{repository}/referrers/{digest}", op, _PULL, {"Accept": OCI_INDEX}
        )
        if response.status_code in {404, 405}:
            return None
        if response.status_code != 200:
            raise self._error(op, response=response)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != OCI_INDEX:
            return None
        return response.content

    def delete_tag(self, repository: str, tag: str) -> bool:
        """Remove ``tag`` only (OCI 1.1 ``DELETE /v2/<repo>/manifests/<tag>``).

        True when the tag no longer exists: deleted now, or already gone (a retry of a job
        that deleted it before crashing must not fail). False when the registry cannot delete
        by tag (400, 405 or UNSUPPORTED; Distribution 2.x answers 400 DIGEST_INVALID): the tag
        is still there and the caller records why. Never falls back to deleting by digest,
        since that deletes the manifest for every other tag that points at it.
        """
        repository = self._repository(repository)
        if not TAG_RE.fullmatch(tag):
            raise self._fail(f"invalid tag {tag!r} for {repository}")
        op = _Op(f"deleting tag {_ref(repository, tag)}", repository, tag)
        response = self._send("DELETE", self._manifest_path(repository, tag), op, _DELETE)
        status = response.status_code
        if status in {200, 202, 204}:
            return True
        entries = _error_entries(response)
        if status in {400, 405} or any(code == "UNSUPPORTED" for code, _ in entries):
            log.info(
                "registry %s cannot delete tag %s: %s",
                self.host,
                _ref(repository, tag),
                self._redact(self._detail(response)),
            )
            return False
        if status == 404:
            # 404 means "no such tag" on registries that delete by tag, but may also mean
            # "no such route" elsewhere; only the tag's presence tells which.
            return self.manifest_digest(repository, tag) is None
        raise self._error(op, response=response)

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
        op = _Op(f"getting blob {repository}@{digest}", repository, digest, kind="get_blob")
        response = self._send("GET", self._blob_path(repository, digest), op, _PULL)
        if response.status_code != 200:
            raise self._error(op, response=response)
        body = response.content
        if digest_matches(body, digest) is False:
            raise self._fail(
                f"registry {self.host} sent blob {repository}@{digest} whose content digest is "
                f"{Manifest.digest_of(body)}"
            )
        return body

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
        this registry) the registry is first asked to link the blob from there. Otherwise a
        monolithic upload: POST opens a session, one PUT ``?digest=`` sends the whole body. A
        file (a binary file object, read from its current position, or a path) is streamed, and
        its digest computed in a first pass if not given.
        """
        repository = self._repository(repository)
        content: _Content
        if isinstance(data, bytes):
            actual = Manifest.digest_of(data)
            if digest is not None and digest != actual:
                raise self._fail(
                    f"cannot upload a blob whose digest is {actual} as {digest} to {repository}"
                )
            digest, size, content = actual, len(data), data
        else:
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
        op = _Op(f"uploading blob {repository}@{digest}", repository, digest)
        location = self._start_upload(repository, digest, mount_from, op)
        if location is None:
            self._on_blob("mounted", size)
            return digest
        url = location.copy_add_param("digest", digest)
        headers = {"Content-Type": _BLOB_TYPE, "Content-Length": str(size)}
        if _origin(url) == _origin(httpx.URL(self.base_url)):
            response = self._send("PUT", str(url), op, _PUSH, headers, content)
        else:
            # An upload session elsewhere (object storage) gets the data, not our credentials.
            response = self._request("PUT", str(url), op, headers, content, None)
        if response.status_code not in {201, 204}:
            raise self._error(op, response=response)
        stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise self._fail(f"registry {self.host} stored blob {repository}@{digest} as {stored}")
        self._on_blob("uploaded", size)
        return digest

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Link blob ``digest`` from ``from_repository`` into ``repository`` without copying.

        True if the blob is now in ``repository``; False if the registry declined (it may not
        mount, or we may not read ``from_repository``), in which case the caller uploads it.
        """
        repository = self._repository(repository)
        self._check_digest(digest)
        op = _Op(f"mounting blob {digest} into {repository}", repository, digest)
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
        op = _Op("checking /v2/")
        response = self._send("GET", "/v2/", op, ())
        if response.status_code != 200:
            raise self._error(op, response=response)

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
            raise self._fail(f"invalid repository name {repository!r} for registry {self.host}")
        return repository

    def _check_reference(self, reference: str) -> None:
        if not (TAG_RE.fullmatch(reference) or is_digest(reference)):
            raise self._fail(f"invalid tag or digest {reference!r}")

    def _check_digest(self, digest: str) -> None:
        if not is_digest(digest):
            raise self._fail(f"invalid digest {digest!r}")

    @staticmethod
    def _manifest_path(repository: str, reference: str) -> str:
        return f"/v2/{repository}/manifests/{reference}"

    @staticmethod
    def _blob_path(repository: str, digest: str) -> str:
        return f"/v2/{repository}/blobs/{digest}"

    def _blob_exists(self, repository: str, digest: str, actions: tuple[str, ...]) -> bool:
        op = _Op(f"checking blob {repository}@{digest}", repository, digest)
        response = self._send("HEAD", self._blob_path(repository, digest), op, actions)
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._error(op, response=response)

    def _start_upload(
        self, repository: str, digest: str, mount_from: str | None, op: _Op
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
                raise self._fail(f"registry {self.host} opened an upload without a Location")
            raise self._error(op, response=response)
        # Relative on some registries (GHCR, ACR), absolute on others (Distribution, Hub).
        return httpx.URL(self.base_url + path).join(location)

    def _media_type(self, response: httpx.Response, op: _Op) -> str:
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
        raise self._fail(f"registry {self.host} sent no media type while {op.doing}")

    def _send(
        self,
        method: str,
        path: str,
        op: _Op,
        actions: tuple[str, ...],
        headers: Mapping[str, str] | None = None,
        content: _Content = None,
        *,
        extra_scope: str | None = None,
    ) -> httpx.Response:
        """One request, retried once with credentials if the registry challenges it.

        ``path`` is relative to the registry, or an absolute URL of its own origin (an upload
        session's Location).
        """
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        repository = op.repository if actions else None
        sent_auth = self._auth.cached(repository, actions, extra_scope)
        response = self._request(method, url, op, headers, content, sent_auth)
        if response.status_code != 401:
            return response

        def fetch(realm: str, service: str | None, scope: str) -> tuple[str, float | None]:
            return self._fetch_token(realm, service, scope, op)

        try:
            auth = self._auth.answer(
                response.headers.get_list("WWW-Authenticate"),
                repository,
                actions,
                sent_auth,
                fetch,
                extra_scope,
            )
        except RegistryError as exc:
            # The token service refused our credentials: the same case as a 401 below.
            if exc.status_code != 401 or self._refresh_credentials is None:
                raise
            auth = None
        if auth is not None:
            response = self._request(method, url, op, headers, content, auth)
        if response.status_code != 401 or self._refresh_credentials is None:
            return response
        refresh, self._refresh_credentials = self._refresh_credentials, None
        username, password = refresh()
        self.username = username
        self._auth = RegistryAuth(username=username, password=password)
        return self._send(method, path, op, actions, headers, content, extra_scope=extra_scope)

    def _request(
        self,
        method: str,
        url: str,
        op: _Op,
        headers: Mapping[str, str] | None,
        content: _Content,
        auth: str | None,
        params: httpx.QueryParams | None = None,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if auth is not None:
            all_headers["Authorization"] = auth
        try:
            return self._http.request(
                method,
                url,
                headers=all_headers,
                content=content() if callable(content) else content,
                params=params,
                # Manifests and tokens may be served from a CDN; httpx drops Authorization on
                # redirects to another origin. Writes must not be replayed elsewhere.
                follow_redirects=method in {"GET", "HEAD"},
            )
        except httpx.HTTPError as exc:
            raise self._error(op, exc=exc) from exc

    def _fetch_token(
        self, realm: str, service: str | None, scope: str, op: _Op
    ) -> tuple[str, float | None]:
        """A new token from the realm and its lifetime in seconds (if the server said)."""
        try:
            realm_scheme = httpx.URL(realm).scheme
        except httpx.InvalidURL:
            realm_scheme = ""
        token_op = _Op(op.doing, op.repository, op.reference, kind="token")
        if realm_scheme not in {"http", "https"}:
            raise self._fail(f"registry {self.host} sent an unusable token realm {realm!r}")
        if realm_scheme == "http" and self.scheme == "https":
            # Our password would cross the network in clear text to a realm chosen by whoever
            # answered; an https registry has no reason to ask for that.
            raise self._fail(f"registry {self.host} sent a plain-http token realm {realm!r}")
        query = httpx.QueryParams({"service": service} if service else {})
        for item in scope.split():
            query = query.add("scope", item)
        response = self._request("GET", realm, token_op, None, None, self._auth.basic_header, query)
        if response.status_code != 200:
            raise self._error(token_op, response=response)
        try:
            data = response.json()
        except ValueError:
            data = None
        token = None
        if isinstance(data, dict):
            token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._fail(f"token server of registry {self.host} returned no token")
        expires_in = data.get("expires_in") if isinstance(data, dict) else None
        return token, float(expires_in) if isinstance(expires_in, int | float) else None

    # ------------------------------------------------------------------ errors

    def _fail(
        self,
        message: str,
        *,
        retryable: bool = False,
        status_code: int | None = None,
        code: str | None = None,
    ) -> RegistryError:
        """Build the exception: one line, secrets blanked, whatever the message quoted."""
        cls = RegistryRetryableError if retryable else RegistryPermanentError
        return cls(self._redact(message), status_code=status_code, code=code)

    def _redact(self, text: str) -> str:
        # Registries echo request details into error bodies; never pass our secrets on.
        text = " ".join(text.split())
        for secret in self._auth.secrets():
            text = text.replace(secret, "<redacted>")
        return text

    def _detail(self, response: httpx.Response) -> str:
        entries = _error_entries(response)
        parts = [": ".join(p for p in (code, message) if p) for code, message in entries]
        detail = "; ".join(p for p in parts if p) or f"HTTP {response.status_code}"
        if len(detail) > _DETAIL_MAX:
            detail = detail[: _DETAIL_MAX - 3] + "..."
        return detail

    def _error(
        self,
        op: _Op,
        *,
        response: httpx.Response | None = None,
        exc: httpx.HTTPError | None = None,
    ) -> RegistryError:
        """The one translation of transport errors and non-2xx answers into job errors."""
        if exc is not None:
            if isinstance(exc, httpx.TimeoutException):
                return self._fail(
                    f"registry {self.host} timed out while {op.doing}", retryable=True
                )
            if _is_certificate_error(exc):
                return self._fail(
                    f"registry {self.host}: TLS certificate verification failed while {op.doing}"
                )
            if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError):
                return self._fail(
                    f"could not reach registry {self.host} while {op.doing}: "
                    f"{type(exc).__name__}: {exc}",
                    retryable=True,
                )
            return self._fail(f"registry {self.host} request failed while {op.doing}: {exc}")

        assert response is not None
        status = response.status_code
        entries = _error_entries(response)
        code = next((c for c, _ in entries if c), None)
        detail = self._detail(response)
        if status in {408, 429} or status >= 500:
            return self._fail(
                f"registry {self.host} answered HTTP {status} while {op.doing}: {detail}",
                retryable=True,
                status_code=status,
                code=code,
            )
        if status in {401, 403}:
            target = op.repository or "the registry"
            return self._fail(
                f"registry {self.host} denied access to {target}: {detail}",
                status_code=status,
                code=code,
            )
        if status == 404 and op.kind == "get_manifest" and op.repository and op.reference:
            return self._fail(
                f"manifest {_ref(op.repository, op.reference)} not found",
                status_code=status,
                code=code,
            )
        if status == 404 and op.kind == "get_blob" and op.repository and op.reference:
            return self._fail(
                f"blob {op.repository}@{op.reference} not found",
                status_code=status,
                code=code,
            )
        who = f"token server of registry {self.host}" if op.kind == "token" else None
        who = who or f"registry {self.host}"
        return self._fail(
            f"{who} answered HTTP {status} while {op.doing}: {detail}",
            status_code=status,
            code=code,
        )
