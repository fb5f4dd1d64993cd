"""An in-memory OCI registry for unit tests, reached through ``httpx.MockTransport``.

One registry for every unit test that talks to a registry (the way go-containerregistry's
``pkg/registry`` serves its tests): it speaks the OCI distribution API as a real registry does,
so tests assert on what ended up stored, and a test scripts a response by hand only where a
particular wire behaviour is the point (see ``intercept``). Real registries (Distribution with
htpasswd) are in tests/integration.

Construction (the defaults shown)::

    registry = OciRegistry(
        host="registry.example.com",  # the registry's API host
        auth="none",            # "none" | "basic" | "bearer" (Docker token auth, like Hub:
                                # challenged with the scope each request needs, checked
                                # against what the token was granted; the realm grants any
                                # scope asked with the right Basic credentials, or to
                                # anyone when username is None)
        username="robot", password="hunter2-Sup3r-s3cret",  # what Basic and the realm accept
        token_prefix="tok",     # tokens are "<prefix>-1", "<prefix>-2", ... in issue order
        token_field="token",    # or "access_token", as OAuth2 servers answer
        token_expires_in=None,  # the token answer's expires_in (absent when None)
        realm="https://auth.example.com/token",
        referrers_api=False,    # OCI 1.1 GET /v2/<name>/referrers/<digest>; off: 404
        delete_tags=True,       # DELETE of a manifest by tag; off: 400 DIGEST_INVALID (Dist. 2.x)
        mount=True,             # cross-repository blob mount (POST ?mount=&from=)
        upload_location="absolute",  # "absolute" | "relative" | "elsewhere" (object storage)
        redirect_blobs=False,   # GET blob answers 307 to storage.example.com, as S3 drivers do
        verify_references=True, # a manifest PUT needs its blobs (or an index its manifests)
        blob_ranges=True,       # GET blob honours "Range: bytes=N-" (206); off: always 200
    )

Content, keyed by repository (``name`` in the spec), readable and writable by tests::

    registry.blobs[(repository, digest)] = data          # bytes
    registry.manifests[(repository, digest)] = (body, media_type)
    registry.tags[(repository, tag)] = digest            # a tag names a stored manifest
    registry.put_blob(repository, data) -> digest
    registry.put_manifest(repository, body, media_type, tag=None) -> digest
    registry.manifest(repository, tag_or_digest) -> (body, media_type) | None
    registry.doc(repository, tag_or_digest) -> the manifest's JSON

Routes: ``/v2/``; blobs HEAD/GET/DELETE; uploads POST (session, monolithic ``?digest=``, mount),
PATCH (chunks; a ``Content-Range`` that does not start where the session stands is 416, as the
spec says), PUT ``?digest=`` (finish), GET (status: ``Range`` and a fresh ``Location``), DELETE
(cancel); like Distribution, every answer on a session moves its ``_state``; manifests
HEAD/GET/PUT/DELETE by tag or digest; ``tags/list`` (with ``n``/``last``); referrers; the token
realm (``auth.example.com``) and object storage (``storage.example.com``) on the same transport.

Clients::

    registry.client(**kwargs) -> RegistryClient   # its own credentials unless given others
    registry.client                                # usable as a RegistryFactory (host -> client)
    registry.transport() -> httpx.MockTransport

Faults and scripting:

* ``registry.faults[(method, kind)] = status`` answers every such request with ``status``
  (kind: "base", "blob", "upload", "manifest", "tags", "referrers") once past auth;
  ``registry.fail_next(method, kind, status)`` only the next one. A 401 comes with the
  registry's challenge, as a revoked token would.
* ``registry.cut_next_patch(after)``: the next chunk PATCH stores only its first ``after``
  bytes and then fails as a connection reset would (an interrupted upload). With
  ``late=True`` those bytes land only after the next status GET has answered, so the
  ``_state`` that GET handed out is already stale (Distribution 2.x then cancels the session).
* ``registry.intercept = fn`` sees every request first; returning a response (or raising an
  httpx exception) replaces the registry's answer, returning None lets it answer.
* ``registry.forget_tokens()`` revokes every token and restarts their numbering (key rotation).

The log, in arrival order: ``registry.log`` (an ``Exchange`` of request, response and parsed
route each), ``registry.requests`` (to the registry and storage), ``registry.token_requests``,
``registry.writes()`` ((method, path) of writes not refused by an auth challenge) and
``registry.reads(kind)`` (references the registry served by GET).

Replacing tests/imaging/test_runner.py's FakeRegistry (tried: its 21 tests pass with this):
``OciRegistry(REGISTRY)`` (a ``host:port`` on loopback is spoken to over http, as the client
does) and ``registry_factory=registry.client``; ``registry.client()`` where a test hands the
runner a client itself; ``OciRegistry(delete_tags=False)`` for ``can_delete=False``;
``registry.tags[(path, tag)]`` as before, but a tag must name a stored manifest, so the digests
are real ones: ``DIGEST_1 = registry.put_manifest(path, body, media_type)`` (with
``verify_references=False`` for bodies that name no pushed blobs).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from mlflow_dock.oci.manifest import OCI_INDEX
from mlflow_dock.oci.remote import RegistryClient

__all__ = ["Exchange", "OciRegistry", "Route", "basic_header", "oci_errors", "sha256"]

TOKEN_HOST = "auth.example.com"
STORAGE_HOST = "storage.example.com"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_ROUTE_RE = re.compile(
    r"/v2/(?P<name>.+?)/(?P<kind>blobs/uploads|blobs|manifests|tags|referrers)(?:/(?P<ref>.*))?"
)
_KINDS = {
    "blobs/uploads": "upload",
    "blobs": "blob",
    "manifests": "manifest",
    "tags": "tags",
    "referrers": "referrers",
}
_INDEX_TYPES = frozenset({OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"})


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def oci_errors(code: str, message: str) -> dict[str, object]:
    return {"errors": [{"code": code, "message": message, "detail": None}]}


@dataclass(frozen=True)
class Route:
    """What a request addressed: ``kind`` is "base", "blob", "upload", "manifest", "tags",
    "referrers", "token" or "storage"; ``reference`` a digest, tag or upload session."""

    kind: str
    repository: str | None = None
    reference: str | None = None


@dataclass
class Exchange:
    request: httpx.Request
    response: httpx.Response
    route: Route

    @property
    def challenged(self) -> bool:
        """Refused for want of (valid) credentials: the client was asked to authenticate."""
        return self.response.status_code == 401


@dataclass
class _Session:
    repository: str
    state: str
    data: bytearray = field(default_factory=bytearray)
    # Every _state handed out: the spec lets a client ask for the status with an older one.
    states: set[str] = field(default_factory=set)
    # Bytes of a broken-off chunk the registry has not written yet (see cut_next_patch).
    late: bytes = b""

    def move(self) -> None:
        self.states.add(self.state)
        self.state = uuid.uuid4().hex[:8]


class OciRegistry:
    """See the module docstring."""

    def __init__(
        self,
        host: str = "registry.example.com",
        *,
        auth: Literal["none", "basic", "bearer"] = "none",
        username: str | None = "robot",
        password: str | None = "hunter2-Sup3r-s3cret",
        token_prefix: str = "tok",
        token_field: str = "token",
        token_expires_in: int | None = None,
        realm: str = f"https://{TOKEN_HOST}/token",
        referrers_api: bool = False,
        delete_tags: bool = True,
        mount: bool = True,
        upload_location: Literal["absolute", "relative", "elsewhere"] = "absolute",
        redirect_blobs: bool = False,
        verify_references: bool = True,
        blob_ranges: bool = True,
    ) -> None:
        self.host = host
        self.auth = auth
        self.username = username
        self.password = password
        self.token_prefix = token_prefix
        self.token_field = token_field
        self.token_expires_in = token_expires_in
        self.realm = realm
        self.referrers_api = referrers_api
        self.delete_tags = delete_tags
        self.mount = mount
        self.upload_location = upload_location
        self.redirect_blobs = redirect_blobs
        self.verify_references = verify_references
        self.blob_ranges = blob_ranges
        self._cut_patch: int | None = None
        self._cut_late = False

        self.blobs: dict[tuple[str, str], bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.sessions: dict[str, _Session] = {}

        self.faults: dict[tuple[str, str], int] = {}
        self._once: list[tuple[str, str, int]] = []
        self.intercept: Callable[[httpx.Request], httpx.Response | None] | None = None

        self.issued = 0
        # Token -> the scope items it grants ("repository:team/x:pull,push").
        self._tokens: dict[str, set[str]] = {}
        self.log: list[Exchange] = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ clients

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def client(self, host: str | None = None, **kwargs: Any) -> RegistryClient:
        """A RegistryClient for this registry, logging in with its credentials by default.

        ``host`` is accepted (and ignored unless it is this registry's) so that ``client``
        itself serves as a RegistryFactory.
        """
        if host is not None and host != self.host:
            raise AssertionError(f"this registry is {self.host}, not {host}")
        kwargs.setdefault("username", self.username)
        kwargs.setdefault("password", self.password)
        return RegistryClient(self.host, transport=self.transport(), **kwargs)

    # ------------------------------------------------------------------ content

    def put_blob(self, repository: str, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[(repository, digest)] = data
        return digest

    def put_manifest(
        self, repository: str, body: bytes, media_type: str, tag: str | None = None
    ) -> str:
        digest = sha256(body)
        self.manifests[(repository, digest)] = (body, media_type)
        if tag is not None:
            self.tags[(repository, tag)] = digest
        return digest

    def resolve(self, repository: str, reference: str) -> str | None:
        """The digest ``reference`` (a tag or digest) names in ``repository``, if stored."""
        digest = reference if ":" in reference else self.tags.get((repository, reference))
        return digest if digest is not None and (repository, digest) in self.manifests else None

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        digest = self.resolve(repository, reference)
        return None if digest is None else self.manifests[(repository, digest)]

    def doc(self, repository: str, reference: str) -> Any:
        stored = self.manifest(repository, reference)
        if stored is None:
            raise KeyError(f"{repository}:{reference}")
        return json.loads(stored[0])

    def forget_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()
            self.issued = 0

    def fail_next(self, method: str, kind: str, status: int) -> None:
        self._once.append((method, kind, status))

    def cut_next_patch(self, after: int, *, late: bool = False) -> None:
        self._cut_patch, self._cut_late = after, late

    # ------------------------------------------------------------------ log

    @property
    def requests(self) -> list[httpx.Request]:
        return [e.request for e in self.log if e.route.kind != "token"]

    @property
    def token_requests(self) -> list[httpx.Request]:
        return [e.request for e in self.log if e.route.kind == "token"]

    def writes(self) -> list[tuple[str, str]]:
        return [
            (e.request.method, e.request.url.path)
            for e in self.log
            if e.route.kind != "token" and e.request.method in WRITES and not e.challenged
        ]

    def reads(self, kind: str = "blob") -> list[str]:
        """References of ``kind`` (by default blobs) the registry served to a GET."""
        return [
            str(e.route.reference)
            for e in self.log
            if e.route.kind == kind and e.request.method == "GET" and e.response.status_code < 400
        ]

    # ------------------------------------------------------------------ HTTP

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        route = self._route(request)
        with self._lock:
            response: httpx.Response | None = None
            try:
                if self.intercept is not None:
                    response = self.intercept(request)
                if response is None:
                    response = self._answer(request, route)
            except Exception as exc:  # a scripted transport error: still logged
                self.log.append(Exchange(request, httpx.Response(599), route))
                raise exc
            self.log.append(Exchange(request, response, route))
            return response

    def _route(self, request: httpx.Request) -> Route:
        if request.url.host == TOKEN_HOST:
            return Route("token")
        if request.url.host == STORAGE_HOST:
            return Route("storage", reference=request.url.path.strip("/"))
        path = request.url.path
        if path == "/v2/":
            return Route("base")
        match = _ROUTE_RE.fullmatch(path)
        if match is None:
            return Route("unknown")
        return Route(_KINDS[match["kind"]], match["name"], match["ref"] or None)

    def _answer(self, request: httpx.Request, route: Route) -> httpx.Response:
        if route.kind == "token":
            return self._token(request)
        if route.kind == "storage":
            return self._storage(request, route)
        if self.host not in (request.url.host, request.url.netloc.decode()):
            return httpx.Response(404, json=oci_errors("NAME_UNKNOWN", "no such registry"))
        denied = self._challenge(request, route)
        if denied is not None:
            return denied
        fault = self._fault(request.method, route.kind)
        if fault is not None:
            if fault == 401:
                return self._unauthorized(request, route)
            return httpx.Response(fault, json=oci_errors("UNKNOWN", "injected failure"))
        if route.kind == "base":
            return httpx.Response(200, json={})
        assert route.repository is not None
        handler = {
            "blob": self._blob,
            "upload": self._upload,
            "manifest": self._manifest,
            "tags": self._tags,
            "referrers": self._referrers,
        }.get(route.kind)
        if handler is None:
            return httpx.Response(404, json=oci_errors("UNSUPPORTED", "no such route"))
        return handler(request, route.repository, route.reference)

    def _fault(self, method: str, kind: str) -> int | None:
        for i, (m, k, status) in enumerate(self._once):
            if (m, k) == (method, kind):
                del self._once[i]
                return status
        return self.faults.get((method, kind))

    # ------------------------------------------------------------------ auth

    def _challenge(self, request: httpx.Request, route: Route) -> httpx.Response | None:
        sent = request.headers.get("Authorization")
        if self.auth == "basic":
            if self.username is not None and sent == basic_header(
                self.username, str(self.password)
            ):
                return None
            return self._unauthorized(request, route)
        if self.auth == "bearer":
            granted = self._tokens.get((sent or "").removeprefix("Bearer "))
            if granted is not None and self._needed(request, route) <= granted:
                return None
            return self._unauthorized(request, route)
        return None

    def _needed(self, request: httpx.Request, route: Route) -> set[str]:
        """The scope items a request needs, as Distribution's token auth asks for them."""
        if route.repository is None:
            return set()
        if request.method in {"GET", "HEAD"}:
            actions = "pull"
        elif request.method == "DELETE" and route.kind in {"manifest", "blob"}:
            actions = "delete"
        else:
            actions = "pull,push"
        needed = {f"repository:{route.repository}:{a}" for a in actions.split(",")}
        source = request.url.params.get("from")
        if route.kind == "upload" and request.method == "POST" and source:
            needed.add(f"repository:{source}:pull")
        return needed

    def _unauthorized(self, request: httpx.Request, route: Route) -> httpx.Response:
        if self.auth == "bearer":
            header = f'Bearer realm="{self.realm}",service="fake-registry"'
            items = _merge(self._needed(request, route))
            if items:
                header += f',scope="{" ".join(items)}"'
        else:
            header = 'Basic realm="fake"'
        return httpx.Response(
            401,
            headers={"WWW-Authenticate": header},
            json=oci_errors("UNAUTHORIZED", "authentication required"),
        )

    def _token(self, request: httpx.Request) -> httpx.Response:
        if self.username is not None:
            expected = basic_header(self.username, str(self.password))
            if request.headers.get("Authorization") != expected:
                return httpx.Response(401, json={"details": "incorrect username or password"})
        self.issued += 1
        token = f"{self.token_prefix}-{self.issued}"
        granted: set[str] = set()
        for item in request.url.params.get_list("scope"):
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            granted.update(f"{kind}:{name}:{a}" for a in actions.split(",") if a)
        self._tokens[token] = granted
        body: dict[str, object] = {self.token_field: token}
        if self.token_expires_in is not None:
            body["expires_in"] = self.token_expires_in
        return httpx.Response(200, json=body)

    # ------------------------------------------------------------------ blobs

    def _blob(self, request: httpx.Request, repository: str, digest: str | None) -> httpx.Response:
        if digest is None or (repository, digest) not in self.blobs:
            return httpx.Response(404, json=oci_errors("BLOB_UNKNOWN", "blob unknown"))
        if request.method == "DELETE":
            del self.blobs[(repository, digest)]
            return httpx.Response(202)
        body = self.blobs[(repository, digest)]
        headers = {"Docker-Content-Digest": digest, "Content-Length": str(len(body))}
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        if self.redirect_blobs:
            return httpx.Response(
                307, headers={"Location": f"https://{STORAGE_HOST}/{digest}?sig=1"}
            )
        return self._ranged(request, body, headers)

    def _ranged(
        self, request: httpx.Request, body: bytes, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        wanted = request.headers.get("Range", "")
        if not (self.blob_ranges and wanted.startswith("bytes=") and wanted.endswith("-")):
            return httpx.Response(200, headers=headers, content=body)
        start = int(wanted[len("bytes=") : -1])
        part = body[start:]
        ranged = {
            "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
            "Content-Length": str(len(part)),
        }
        return httpx.Response(206, headers=ranged, content=part)

    def _storage(self, request: httpx.Request, route: Route) -> httpx.Response:
        """Object storage: signed blob downloads, and upload sessions on another origin."""
        name = str(route.reference)
        if request.method == "PUT":
            session = self.sessions.get(name)
            if session is None:
                return httpx.Response(404)
            return self._finish(request, name, session)
        for (_, digest), body in self.blobs.items():
            if digest == name:
                return self._ranged(request, body)
        return httpx.Response(404)

    def _upload(self, request: httpx.Request, repository: str, ref: str | None) -> httpx.Response:
        if request.method == "POST":
            return self._start_upload(request, repository)
        session = self.sessions.get(ref or "")
        if session is None or session.repository != repository:
            return httpx.Response(404, json=oci_errors("BLOB_UPLOAD_UNKNOWN", "upload unknown"))
        state = request.url.params.get("_state")
        if state != session.state and not (request.method == "GET" and state in session.states):
            # As Distribution: a 404, and the session is cancelled.
            del self.sessions[ref or ""]
            return httpx.Response(404, json=oci_errors("BLOB_UPLOAD_INVALID", "lost _state"))
        assert ref is not None
        if request.method == "DELETE":
            del self.sessions[ref]
            return httpx.Response(204)
        if request.method == "GET":
            session.move()
            answer = httpx.Response(204, headers=self._progress(request, ref, session))
            if session.late:
                session.data.extend(session.late)
                session.late = b""
                session.move()
            return answer
        if request.method == "PATCH":
            return self._patch(request, ref, session)
        if request.method == "PUT":
            return self._finish(request, ref, session)
        return httpx.Response(405, json=oci_errors("UNSUPPORTED", request.method))

    def _patch(self, request: httpx.Request, name: str, session: _Session) -> httpx.Response:
        given = request.headers.get("Content-Range")
        body = request.content
        if given is not None:
            first, _, last = given.partition("-")
            if int(first) != len(session.data):
                headers = self._progress(request, name, session)
                return httpx.Response(416, headers=headers, json=oci_errors("RANGE_INVALID", given))
            if int(last) - int(first) + 1 != len(body):
                return httpx.Response(400, json=oci_errors("SIZE_INVALID", "Content-Range"))
        if self._cut_patch is not None:
            # What arrived before the connection broke stays in the session.
            kept, self._cut_patch = body[: self._cut_patch], None
            if self._cut_late:
                session.late = bytes(kept)
            else:
                session.data.extend(kept)
            raise httpx.RemoteProtocolError("connection reset by peer", request=request)
        session.data.extend(body)
        session.move()
        return httpx.Response(202, headers=self._progress(request, name, session))

    def _start_upload(self, request: httpx.Request, repository: str) -> httpx.Response:
        params = request.url.params
        mount, source = params.get("mount"), params.get("from")
        if mount and source and self.mount and (source, mount) in self.blobs:
            self.blobs[(repository, mount)] = self.blobs[(source, mount)]
            location = f"/v2/{repository}/blobs/{mount}"
            return httpx.Response(
                201, headers={"Location": location, "Docker-Content-Digest": mount}
            )
        if params.get("digest"):  # a monolithic upload in the POST itself
            return self._store(request, repository, request.content)
        name = uuid.uuid4().hex
        session = _Session(repository, state=uuid.uuid4().hex[:8])
        self.sessions[name] = session
        return httpx.Response(202, headers=self._progress(request, name, session))

    def _location(self, request: httpx.Request, name: str, session: _Session) -> str:
        path = f"/v2/{session.repository}/blobs/uploads/{name}?_state={session.state}"
        if self.upload_location == "relative":
            return path
        if self.upload_location == "elsewhere":
            return f"https://{STORAGE_HOST}/{name}"
        return f"{request.url.scheme}://{request.url.netloc.decode()}{path}"

    def _progress(self, request: httpx.Request, name: str, session: _Session) -> dict[str, str]:
        end = max(len(session.data) - 1, 0)
        return {"Location": self._location(request, name, session), "Range": f"0-{end}"}

    def _finish(self, request: httpx.Request, name: str, session: _Session) -> httpx.Response:
        declared = request.headers.get("Content-Length")
        if declared is not None and int(declared) != len(request.content):
            return httpx.Response(400, json=oci_errors("SIZE_INVALID", "Content-Length"))
        response = self._store(request, session.repository, session.data + request.content)
        if response.status_code == 201:
            del self.sessions[name]
        return response

    def _store(self, request: httpx.Request, repository: str, data: bytes) -> httpx.Response:
        digest = request.url.params.get("digest")
        if not digest:
            return httpx.Response(400, json=oci_errors("DIGEST_INVALID", "no digest"))
        if sha256(bytes(data)) != digest:
            return httpx.Response(400, json=oci_errors("DIGEST_INVALID", "digest mismatch"))
        self.blobs[(repository, digest)] = bytes(data)
        location = f"/v2/{repository}/blobs/{digest}"
        return httpx.Response(201, headers={"Docker-Content-Digest": digest, "Location": location})

    # ------------------------------------------------------------------ manifests

    def _manifest(
        self, request: httpx.Request, repository: str, reference: str | None
    ) -> httpx.Response:
        if reference is None:
            return httpx.Response(404, json=oci_errors("MANIFEST_UNKNOWN", "no reference"))
        if request.method == "PUT":
            return self._put_manifest(request, repository, reference)
        if request.method == "DELETE":
            return self._delete_manifest(repository, reference)
        digest = self.resolve(repository, reference)
        if digest is None:
            return httpx.Response(404, json=oci_errors("MANIFEST_UNKNOWN", "manifest unknown"))
        body, media_type = self.manifests[(repository, digest)]
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        return httpx.Response(
            200, headers=headers, content=b"" if request.method == "HEAD" else body
        )

    def _put_manifest(
        self, request: httpx.Request, repository: str, reference: str
    ) -> httpx.Response:
        body = request.content
        digest = sha256(body)
        if ":" in reference and reference != digest:
            return httpx.Response(400, json=oci_errors("DIGEST_INVALID", reference))
        try:
            document = json.loads(body)
        except ValueError:
            return httpx.Response(400, json=oci_errors("MANIFEST_INVALID", "not JSON"))
        media_type = request.headers.get("Content-Type", "")
        if self.verify_references:
            missing = self._missing(repository, document, media_type)
            if missing is not None:
                return httpx.Response(400, json=oci_errors(*missing))
        self.put_manifest(repository, body, media_type, None if ":" in reference else reference)
        headers = {
            "Docker-Content-Digest": digest,
            "Location": f"/v2/{repository}/manifests/{digest}",
        }
        subject = document.get("subject") if isinstance(document, dict) else None
        if self.referrers_api and isinstance(subject, dict):
            headers["OCI-Subject"] = str(subject.get("digest"))
        return httpx.Response(201, headers=headers)

    def _missing(self, repository: str, document: Any, media_type: str) -> tuple[str, str] | None:
        if not isinstance(document, dict):
            return ("MANIFEST_INVALID", "not an object")
        if media_type in _INDEX_TYPES or "manifests" in document:
            for child in document.get("manifests") or []:
                if (repository, child.get("digest")) not in self.manifests:
                    return ("MANIFEST_UNKNOWN", str(child.get("digest")))
            return None
        for descriptor in [document.get("config"), *(document.get("layers") or [])]:
            if isinstance(descriptor, dict) and (repository, descriptor.get("digest")) not in (
                self.blobs
            ):
                return ("MANIFEST_BLOB_UNKNOWN", str(descriptor.get("digest")))
        return None

    def _delete_manifest(self, repository: str, reference: str) -> httpx.Response:
        if ":" in reference:
            if (repository, reference) not in self.manifests:
                return httpx.Response(404, json=oci_errors("MANIFEST_UNKNOWN", reference))
            del self.manifests[(repository, reference)]
            for key in [k for k, d in self.tags.items() if k[0] == repository and d == reference]:
                del self.tags[key]
            return httpx.Response(202)
        if not self.delete_tags:
            # What CNCF Distribution 2.x answers to a DELETE by tag.
            return httpx.Response(
                400,
                json=oci_errors("DIGEST_INVALID", "provided digest did not match uploaded content"),
            )
        if self.tags.pop((repository, reference), None) is None:
            return httpx.Response(404, json=oci_errors("MANIFEST_UNKNOWN", reference))
        return httpx.Response(202)

    # ------------------------------------------------------------------ listings

    def _tags(self, request: httpx.Request, repository: str, ref: str | None) -> httpx.Response:
        if ref != "list" or request.method != "GET":
            return httpx.Response(404, json=oci_errors("UNSUPPORTED", "no such route"))
        names = sorted(tag for repo, tag in self.tags if repo == repository)
        if not names and not any(repo == repository for repo, _ in self.manifests):
            return httpx.Response(404, json=oci_errors("NAME_UNKNOWN", repository))
        last = request.url.params.get("last")
        if last:
            names = [n for n in names if n > last]
        headers: dict[str, str] = {}
        count = request.url.params.get("n")
        if count is not None and len(names) > int(count):
            names = names[: int(count)]
            if names:
                link = f"/v2/{repository}/tags/list?n={count}&last={names[-1]}"
                headers["Link"] = f'<{link}>; rel="next"'
        return httpx.Response(200, headers=headers, json={"name": repository, "tags": names})

    def _referrers(
        self, request: httpx.Request, repository: str, digest: str | None
    ) -> httpx.Response:
        if not self.referrers_api:
            return httpx.Response(404, json=oci_errors("NAME_UNKNOWN", "no referrers API"))
        wanted = request.url.params.get("artifactType")
        descriptors = []
        for (repo, manifest_digest), (body, media_type) in sorted(self.manifests.items()):
            document = json.loads(body)
            subject = document.get("subject") if isinstance(document, dict) else None
            if repo != repository or not isinstance(subject, dict):
                continue
            if subject.get("digest") != digest:
                continue
            artifact_type = document.get("artifactType") or (document.get("config") or {}).get(
                "mediaType"
            )
            if wanted and artifact_type != wanted:
                continue
            descriptor = {"mediaType": media_type, "digest": manifest_digest, "size": len(body)}
            if artifact_type:
                descriptor["artifactType"] = artifact_type
            if document.get("annotations"):
                descriptor["annotations"] = document["annotations"]
            descriptors.append(descriptor)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        return httpx.Response(200, headers={"Content-Type": OCI_INDEX}, json=index)


def _merge(items: set[str]) -> list[str]:
    """``{"repository:a:pull", "repository:a:push"}`` -> ``["repository:a:pull,push"]``."""
    merged: dict[str, list[str]] = {}
    order = {"pull": 0, "push": 1, "delete": 2}
    for item in sorted(items):
        resource, _, action = item.rpartition(":")
        merged.setdefault(resource, []).append(action)
    return [
        f"{resource}:{','.join(sorted(actions, key=lambda a: order.get(a, 3)))}"
        for resource, actions in merged.items()
    ]
