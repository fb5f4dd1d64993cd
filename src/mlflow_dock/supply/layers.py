"""What an image's layers say about its Python environment, read from the layer tarballs.

Reading the published image itself (not the build's inputs) is what makes the SBOM list exactly
what ``pip list`` reports in a running container, however the image was built: engine path,
registry assembly or MLflow's stock Dockerfile. Only the few files that matter are kept
(dist-info metadata headers, RECORD's hash, direct_url.json, pyvenv.cfg, which ``bin/python``
exist, where an ``MLmodel`` lies) plus whiteouts, so a layer's scan is small enough to cache by
the layer's digest: versions that reuse the runtime layers never read them again.

Pure apart from reading the tar stream it is given.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

__all__ = [
    "FileRecord",
    "LayerScan",
    "LayerScanError",
    "merge_layers",
    "python_site_dirs",
    "scan_layer",
]

# Bumped whenever what a scan records changes, so stale cache entries are not reused.
SCAN_FORMAT: Final = 1

_META_DIR: Final = re.compile(r"(^|/)[^/]+/(site|dist)-packages/[^/]+\.(dist|egg)-info(/|$)")
_DIST_INFO_FILES: Final = frozenset(
    {"METADATA", "PKG-INFO", "RECORD", "direct_url.json", "INSTALLER"}
)
_PYTHON_BIN: Final = re.compile(r"(^|/)bin/python(3(\.\d+)?)?$")
_WHITEOUT: Final = ".wh."
_OPAQUE: Final = ".wh..wh..opq"
_MAX_TEXT: Final = 256 * 1024


class LayerScanError(ValueError):
    """A layer could not be read as a tar archive."""


@dataclass(frozen=True)
class FileRecord:
    """One file of interest: its kind and, for small metadata files, their text."""

    kind: str  # "file" | "link" | "dir"
    text: str | None = None
    sha256: str | None = None
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FileRecord:
        return cls(
            kind=str(doc["kind"]),
            text=doc.get("text"),
            sha256=doc.get("sha256"),
            size=int(doc.get("size") or 0),
        )


@dataclass(frozen=True)
class LayerScan:
    files: Mapping[str, FileRecord] = field(default_factory=dict)
    # Paths this layer deletes from the layers below (``.wh.<name>``), and directories whose
    # lower content it hides entirely (``.wh..wh..opq``).
    whiteouts: Sequence[str] = ()
    opaque_dirs: Sequence[str] = ()

    def to_json(self) -> bytes:
        doc = {
            "format": SCAN_FORMAT,
            "files": {path: rec.to_json() for path, rec in self.files.items()},
            "whiteouts": list(self.whiteouts),
            "opaque_dirs": list(self.opaque_dirs),
        }
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> LayerScan | None:
        """The scan, or None if the cached bytes are from another format or unreadable."""
        try:
            doc = json.loads(data)
            if doc.get("format") != SCAN_FORMAT:
                return None
            return cls(
                files={p: FileRecord.from_json(r) for p, r in doc["files"].items()},
                whiteouts=tuple(doc["whiteouts"]),
                opaque_dirs=tuple(doc["opaque_dirs"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _normalise(name: str) -> str:
    # Tar member names come as "./opt/x", "opt/x" or "/opt/x"; compare them as "opt/x".
    while name.startswith("./"):
        name = name[2:]
    return posixpath.normpath("/" + name).lstrip("/")


def _wanted(path: str) -> bool:
    if _PYTHON_BIN.search(path) or path.endswith(("/pyvenv.cfg", "/MLmodel")):
        return True
    match = _META_DIR.search(path)
    if match is None:
        return False
    rest = path[match.end() :]
    if not rest:
        return True  # the .dist-info / .egg-info entry itself (egg-info may be a plain file)
    return rest in _DIST_INFO_FILES


def _read_text(archive: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str | None, str]:
    handle = archive.extractfile(member)
    data = handle.read() if handle is not None else b""
    digest = hashlib.sha256(data).hexdigest()
    if member.name.endswith("RECORD") or len(data) > _MAX_TEXT:
        return None, digest
    if member.name.endswith(("METADATA", "PKG-INFO")) or (
        member.isfile() and member.name.endswith("-info")
    ):
        # Headers only: the long description below the first blank line is of no use here.
        text = data.decode("utf-8", errors="replace")
        head, _, _ = text.replace("\r\n", "\n").partition("\n\n")
        return head, digest
    return data.decode("utf-8", errors="replace"), digest


def scan_layer(stream: IO[bytes]) -> LayerScan:
    """Scan one layer tarball (gzip or plain; the stream is read once, front to back)."""
    files: dict[str, FileRecord] = {}
    whiteouts: list[str] = []
    opaque: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                path = _normalise(member.name)
                base = posixpath.basename(path)
                parent = posixpath.dirname(path)
                if base == _OPAQUE:
                    opaque.append(parent)
                    continue
                if base.startswith(_WHITEOUT):
                    whiteouts.append(posixpath.join(parent, base[len(_WHITEOUT) :]))
                    continue
                if not _wanted(path):
                    continue
                if member.isdir():
                    files[path] = FileRecord("dir")
                elif member.issym() or member.islnk():
                    files[path] = FileRecord("link", text=member.linkname)
                elif member.isfile():
                    text, digest = _read_text(archive, member)
                    files[path] = FileRecord("file", text=text, sha256=digest, size=member.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise LayerScanError(f"not a readable tar layer: {exc}") from exc
    return LayerScan(files=files, whiteouts=tuple(whiteouts), opaque_dirs=tuple(opaque))


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")


def merge_layers(scans: Iterable[LayerScan]) -> dict[str, FileRecord]:
    """The files of interest in the image's final filesystem, bottom layer first."""
    merged: dict[str, FileRecord] = {}
    for scan in scans:
        hidden = [*scan.whiteouts, *scan.opaque_dirs]
        if hidden:
            merged = {
                path: rec
                for path, rec in merged.items()
                if not any(_under(path, target) for target in scan.whiteouts)
                and not any(path.startswith(d + "/") for d in scan.opaque_dirs)
            }
        merged.update(scan.files)
    return merged


def _pyvenv_cfg(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip().lower()] = value.strip()
    return values


def _lib_dirs(files: Mapping[str, FileRecord], root: str) -> list[str]:
    """``<root>/lib/python3.X/{site,dist}-packages`` present in the image, then Debian's one."""
    prefix = f"{root}/lib/" if root else "lib/"
    found: list[str] = []
    for path in sorted(files):
        match = _META_DIR.search(path)
        if match is None or not path.startswith(prefix):
            continue
        site = path[: match.end()].rstrip("/").rsplit("/", 1)[0]
        if site not in found and re.fullmatch(
            re.escape(prefix) + r"python3(\.\d+)?/(site|dist)-packages", site
        ):
            found.append(site)
    # site-packages before dist-packages, as CPython's site module orders them.
    return sorted(found, key=lambda d: (not d.endswith("site-packages"), d))


def python_site_dirs(files: Mapping[str, FileRecord], path_env: str) -> list[str]:
    """The site-packages directories the image's ``python`` sees, in sys.path order.

    The python is the first ``bin/python3``/``bin/python`` on the image's PATH; its prefix is the
    directory above ``bin``. A venv (``pyvenv.cfg`` beside ``bin``) sees its own site-packages,
    plus its base interpreter's only with ``include-system-site-packages = true``.
    """
    for directory in path_env.split(":"):
        directory = _normalise(directory)
        if not directory.endswith("bin"):
            continue
        if not any(f"{directory}/{name}" in files for name in ("python3", "python")):
            continue
        root = posixpath.dirname(directory)
        dirs = _lib_dirs(files, root)
        cfg = files.get(f"{root}/pyvenv.cfg" if root else "pyvenv.cfg")
        if cfg is not None and cfg.text is not None:
            settings = _pyvenv_cfg(cfg.text)
            if settings.get("include-system-site-packages", "false").lower() == "true":
                home = _normalise(settings.get("home", ""))
                base_root = posixpath.dirname(home) if home.endswith("bin") else home
                dirs += [d for d in _lib_dirs(files, base_root) if d not in dirs]
        return dirs
    return []
