"""The registry client's transfer hook (`on_blob`), which feeds the bytes-uploaded/mounted
metrics: told once per blob how it reached the registry and how big it is."""

from __future__ import annotations

import hashlib

import httpx

from mlflow_dock.oci.remote import RegistryClient

REPO = "team/iris"


class TinyRegistry:
    """Just enough of the blob upload protocol: HEAD, POST (upload or mount), PUT."""

    def __init__(self, *, mountable: bool = False) -> None:
        self.blobs: set[str] = set()
        self.mountable = mountable

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "HEAD" and "/blobs/" in path:
            return httpx.Response(200 if path.rsplit("/", 1)[1] in self.blobs else 404)
        if request.method == "POST" and path.endswith("/blobs/uploads/"):
            mount = request.url.params.get("mount")
            if mount and self.mountable:
                self.blobs.add(mount)
                return httpx.Response(201)
            return httpx.Response(202, headers={"Location": f"/v2/{REPO}/blobs/uploads/u1"})
        if request.method == "PUT" and "/blobs/uploads/" in path:
            digest = request.url.params["digest"]
            self.blobs.add(digest)
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        return httpx.Response(404)


def client(registry: TinyRegistry, seen: list[tuple[str, int]]) -> RegistryClient:
    return RegistryClient(
        "registry.example.com",
        transport=httpx.MockTransport(registry),
        on_blob=lambda outcome, size: seen.append((outcome, size)),
    )


def test_uploaded_then_present():
    seen: list[tuple[str, int]] = []
    registry = TinyRegistry()
    data = b"model layer bytes" * 10
    with client(registry, seen) as c:
        c.upload_blob(REPO, data)
        c.upload_blob(REPO, data)  # already there: nothing sent
    assert seen == [("uploaded", len(data)), ("present", len(data))]


def test_mounted_from_another_repository():
    seen: list[tuple[str, int]] = []
    registry = TinyRegistry(mountable=True)
    data = b"shared runtime layer"
    with client(registry, seen) as c:
        digest = c.upload_blob(REPO, data, mount_from="team/other")
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert seen == [("mounted", len(data))]


def test_without_a_hook_nothing_changes():
    registry = TinyRegistry()
    with RegistryClient("registry.example.com", transport=httpx.MockTransport(registry)) as c:
        c.upload_blob(REPO, b"x" * 5)
    assert len(registry.blobs) == 1
