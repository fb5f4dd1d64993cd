"""What the native builder must know about a base image, read through the registry API.

No engine runs the base image: its manifest and config come from the registry, and its layers
are read as tar streams for three facts:

* glibc version, from the dpkg status file's ``libc6`` entry: it picks the manylinux tag wheels
  are chosen for;
* where its Python lives (``usr/local/bin/python3.X`` as in the official python images, else
  ``usr/bin/python3.X`` as in Debian's): the virtualenv's ``home``;
* which shared libraries it has, to find extensions whose DT_NEEDED it cannot satisfy.

Scanning the layers reads them once per base image digest, each as a stream (a CUDA base runs
to GBs: never in memory); the facts are cached on disk by that digest (a tag may move, a digest
never changes).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, cast

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.wheels import Platform
from mlflow_dock.oci.manifest import DOCKER_MANIFEST_LIST, OCI_INDEX, Manifest
from mlflow_dock.oci.remote import RegistryClient

__all__ = ["BaseFacts", "BaseImage", "NotNativeBase", "resolve_base", "scan_layers"]

_PYTHON_RE: Final = re.compile(r"^(usr/local/bin|usr/bin)/python(3\.\d+)$")
_GLIBC_RE: Final = re.compile(r"^(\d+)\.(\d+)")
# glibc's own banner, for images without a dpkg database (or whose packages were unpacked but
# never configured, as a foreign-architecture debootstrap leaves them).
_LIBC_BANNER_RE: Final = re.compile(rb"GNU C Library [^\n]*?release version (\d+)\.(\d+)")
_INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
_FACTS_FORMAT: Final = 1


class NotNativeBase(PermanentError):
    """The base image cannot carry a natively built runtime (no glibc, no Python, no match)."""


@dataclass(frozen=True)
class BaseFacts:
    glibc: tuple[int, int]
    pythons: dict[str, str]  # "3.11" -> "/usr/bin/python3.11"
    libraries: frozenset[str]  # basenames of shared objects anywhere in the image

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FACTS_FORMAT,
                "glibc": list(self.glibc),
                "pythons": self.pythons,
                "libraries": sorted(self.libraries),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> BaseFacts | None:
        data = json.loads(text)
        if data.get("format") != _FACTS_FORMAT:
            return None
        return cls(
            glibc=(int(data["glibc"][0]), int(data["glibc"][1])),
            pythons=dict(data["pythons"]),
            libraries=frozenset(data["libraries"]),
        )


@dataclass(frozen=True)
class BaseImage:
    """One platform's image of the base: what the builder stacks its layers on."""

    host: str
    repository: str  # inside the registry
    platform: Platform
    manifest: Manifest
    config: dict[str, Any]
    layers: tuple[dict[str, Any], ...]  # the manifest's layer descriptors
    facts: BaseFacts

    def python_for(self, version: str) -> str:
        major_minor = ".".join(version.split(".")[:2])
        path = self.facts.pythons.get(major_minor)
        if path is None:
            have = ", ".join(sorted(self.facts.pythons)) or "none"
            raise NotNativeBase(
                f"base image {self.host}/{self.repository} has no Python {major_minor} "
                f"(it has: {have})"
            )
        return path


def _glibc_from_dpkg(status: str) -> tuple[int, int] | None:
    for paragraph in status.split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in paragraph.splitlines() if ":" in line and line[:1] != " "
        )
        if fields.get("Package", "").strip() == "libc6":
            match = _GLIBC_RE.match(fields.get("Version", "").strip())
            if match:
                return int(match.group(1)), int(match.group(2))
    return None


def scan_layers(blobs: Iterable[bytes | IO[bytes]], *, below: BaseFacts | None = None) -> BaseFacts:
    """The facts from the layers' gzip (or plain) tar blobs, bottom layer first; each is read
    once, front to back, as a stream.

    ``below``: the facts of layers under ``blobs`` (a derived base scans only what it added);
    its libraries are kept by name, so a whiteout in ``blobs`` cannot remove one of them.
    """
    status: str | None = None
    banner: tuple[int, int] | None = None
    pythons: dict[str, str] = dict(below.pythons) if below is not None else {}
    libraries: dict[str, str] = {}  # path -> basename, so whiteouts can remove entries
    for blob in blobs:
        stream = io.BytesIO(blob) if isinstance(blob, bytes) else blob
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./").lstrip("/")
                base = PurePosixPath(name).name
                if base.startswith(".wh."):
                    removed = str(PurePosixPath(name).parent / base[4:])
                    libraries.pop(removed, None)
                    for version, path in list(pythons.items()):
                        if path.lstrip("/") == removed:
                            del pythons[version]
                    continue
                if name == "var/lib/dpkg/status" and member.isfile():
                    file = tar.extractfile(member)
                    if file is not None:
                        status = file.read().decode("utf-8", "replace")
                if base == "libc.so.6" and member.isfile() and banner is None:
                    file = tar.extractfile(member)
                    found = _LIBC_BANNER_RE.search(file.read()) if file is not None else None
                    if found:
                        banner = int(found.group(1)), int(found.group(2))
                match = _PYTHON_RE.match(name)
                if match and (member.isfile() or member.issym() or member.islnk()):
                    version = match.group(2)
                    # The official python images' own build wins over a distro python.
                    if version not in pythons or match.group(1) == "usr/local/bin":
                        pythons[version] = "/" + name
                if ".so" in base and not member.isdir():
                    libraries[name] = base
    glibc = _glibc_from_dpkg(status) if status is not None else None
    glibc = glibc or banner or (below.glibc if below is not None else None)
    if glibc is None:
        raise NotNativeBase(
            "base image has neither a dpkg status with libc6 nor a readable libc.so.6 (not a "
            "glibc image?), so no manylinux tag can be chosen for it"
        )
    inherited = below.libraries if below is not None else frozenset()
    return BaseFacts(
        glibc=glibc, pythons=pythons, libraries=inherited | frozenset(libraries.values())
    )


def _platform_manifest(
    registry: RegistryClient, repository: str, reference: str, platform: Platform
) -> Manifest:
    manifest = registry.get_manifest(repository, reference)
    document = json.loads(manifest.body)
    if manifest.media_type in _INDEX_TYPES or "manifests" in document:
        for entry in document.get("manifests", []):
            wanted = entry.get("platform") or {}
            if wanted.get("os") == platform.os and wanted.get("architecture") == (
                platform.architecture
            ):
                return registry.get_manifest(repository, str(entry["digest"]))
        raise NotNativeBase(f"base image {repository}:{reference} has no {platform} image")
    return manifest


def resolve_base(
    registry: RegistryClient,
    repository: str,
    reference: str,
    platform: Platform,
    *,
    cache_dir: Path,
    parent: BaseImage | None = None,
) -> BaseImage:
    """The base image for ``platform``, with its facts (scanned once per manifest digest).

    ``parent``: an image this one was built on (a derived base); when its layers are this
    image's first layers, only the layers on top are downloaded and scanned.
    """
    manifest = _platform_manifest(registry, repository, reference, platform)
    document = json.loads(manifest.body)
    config_bytes = registry.get_blob(repository, str(document["config"]["digest"]))
    config = json.loads(config_bytes)
    architecture = config.get("architecture")
    if architecture and architecture != platform.architecture:
        raise NotNativeBase(
            f"base image {repository}:{reference} is {config.get('os')}/{architecture}, "
            f"not {platform}"
        )
    layers = tuple(document.get("layers", []))
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{manifest.digest.replace(':', '-')}.json"
    facts: BaseFacts | None = None
    if cached.is_file():
        try:
            facts = BaseFacts.from_json(cached.read_text())
        except (ValueError, KeyError):
            facts = None
    if facts is None:
        below: BaseFacts | None = None
        scan = layers
        parent_digests = [str(layer["digest"]) for layer in parent.layers] if parent else []
        if parent is not None and parent_digests == [
            str(layer["digest"]) for layer in layers[: len(parent_digests)]
        ]:
            below, scan = parent.facts, layers[len(parent_digests) :]

        def streams() -> Iterator[IO[bytes]]:
            for layer in scan:
                size = int(layer["size"]) if "size" in layer else None
                with registry.open_blob(repository, str(layer["digest"]), size) as blob:
                    yield cast(IO[bytes], blob)
                    # To its end, where the content is checked against the digest.
                    while blob.read(1 << 20):
                        pass

        try:
            facts = scan_layers(streams(), below=below)
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise NotNativeBase(f"cannot read base image layers: {exc}") from exc
        # A name of its own per writer, then an atomic rename: two first builds on one base
        # (threads or workers sharing the cache) must not write into the same temporary file.
        tmp = cached.with_name(f"{cached.stem}.{uuid.uuid4().hex}.partial")
        try:
            tmp.write_text(facts.to_json())
            tmp.replace(cached)
        finally:
            tmp.unlink(missing_ok=True)
    return BaseImage(
        host=registry.host,
        repository=repository,
        platform=platform,
        manifest=manifest,
        config=config,
        layers=layers,
        facts=facts,
    )
