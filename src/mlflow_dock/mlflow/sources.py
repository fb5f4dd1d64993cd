"""Where a model version's artifacts may be downloaded from (pure: no I/O).

A model version's source is whatever its author registered: MLflow stores `http://10.0.0.5/`,
`s3://another-teams-bucket/` or `file:///etc` as given, and MLflow's download follows it with
the service's own cloud credentials and tracking credentials. So the URI the download will
actually fetch from (after `models:/` and `runs:/` are resolved through the tracking server)
must be one the operator allows:

- always: `mlflow-artifacts:` URIs served by the tracking server itself (MLflow's proxied
  artifact storage, the default of `mlflow server` since 2.0): no host, or the tracking URI's;
- in addition: each prefix of MLFLOW_DOCK_ALLOWED_SOURCES, such as `s3://team-bucket/models/`
  (a bucket or directory boundary, never a string prefix: `s3://team` allows `s3://team/...`,
  not `s3://team-evil/...`), or a bare `scheme:` (`s3:`) for every location of that scheme.

Anything else fails the version before the first request is made.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from mlflow_dock.errors import PermanentError

__all__ = ["AllowedSources", "SourceNotAllowed", "parse_allowed_sources"]

PROXIED_SCHEME = "mlflow-artifacts"
_ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"


class SourceNotAllowed(PermanentError):
    """The version's artifacts live somewhere the operator did not allow."""


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    netloc: str | None  # None: any location of the scheme
    path: str

    def covers(self, uri: SplitResult, path: str) -> bool:
        if uri.scheme.lower() != self.scheme:
            return False
        if self.netloc is None:
            return True
        if _location(uri) != self.netloc:
            return False
        base = self.path.rstrip("/")
        return not base or path == base or path.startswith(base + "/")


def parse_allowed_sources(text: str) -> tuple[str, ...]:
    """The entries of MLFLOW_DOCK_ALLOWED_SOURCES (comma or space separated); ValueError if bad."""
    entries = tuple(part for part in text.replace(",", " ").split() if part)
    for entry in entries:
        _prefix(entry)
    return entries


def _prefix(entry: str) -> _Prefix:
    parsed = urlsplit(entry)
    if not parsed.scheme:
        raise ValueError(
            f"'{entry}' is not an allowed-source prefix: expected e.g. s3://bucket/path/ or s3:"
        )
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ValueError(f"'{_without_credentials(parsed)}': a prefix has no query or credentials")
    rest = entry[len(parsed.scheme) + 1 :]
    if rest in ("", "//"):
        return _Prefix(parsed.scheme.lower(), None, "")
    path = _normalised_path(parsed.path)
    if path is None:
        raise ValueError(f"'{entry}': a prefix has no '..' segments")
    return _Prefix(parsed.scheme.lower(), _location(parsed), path)


class AllowedSources:
    """The operator's allow-list, checked against the concrete URI the download will fetch."""

    def __init__(self, tracking_uri: str, prefixes: tuple[str, ...] = ()) -> None:
        tracking = urlsplit(tracking_uri)
        self._prefixes = tuple(_prefix(entry) for entry in prefixes)
        self._tracking_location: str | None = None
        if tracking.scheme in ("http", "https"):
            # mlflow-artifacts:/path is fetched from the tracking server (MLflow resolves it
            # against the tracking URI); with a host, from that host. The same artifacts
            # addressed over HTTP are the tracking server's artifact API.
            self._tracking_location = _location(tracking)
            api = (_normalised_path(tracking.path) or "").rstrip("/") + _ARTIFACTS_API
            self._prefixes += (_Prefix(tracking.scheme, self._tracking_location, api),)

    def proxied_path(self, uri: str) -> str | None:
        """The path in the tracking server's artifact store of a `mlflow-artifacts:` URI it
        serves (normalised, relative, never with '..'); None for any other URI."""
        parsed = urlsplit(uri)
        if parsed.scheme.lower() != PROXIED_SCHEME or self._tracking_location is None:
            return None
        if _location(parsed) not in ("", self._tracking_location):
            return None
        path = _normalised_path(parsed.path)
        if path is None:
            return None
        return path.strip("/")

    def check(self, uri: str) -> None:
        """Raise SourceNotAllowed unless fetching `uri` stays where the operator allows."""
        parsed = urlsplit(uri)
        path = _normalised_path(parsed.path) if parsed.scheme or uri.startswith("/") else None
        if path is None:
            raise SourceNotAllowed(
                f"model artifacts at {_shown(parsed)} are not downloaded: a relative or "
                "'..' location is never allowed"
            )
        if self.proxied_path(uri) is not None:
            return
        if not parsed.scheme:
            parsed = urlsplit(f"file://{uri}")
        if any(prefix.covers(parsed, path) for prefix in self._prefixes):
            return
        raise SourceNotAllowed(
            f"model artifacts at {_shown(parsed)} are not downloaded: only the tracking "
            "server's artifacts (mlflow-artifacts:) and the locations in "
            "MLFLOW_DOCK_ALLOWED_SOURCES are"
        )


def _location(parsed: SplitResult) -> str:
    """host[:port], lower-cased, without credentials: what a request would connect to."""
    host = (parsed.hostname or "").lower()
    try:
        port = parsed.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port is not None else host


def _normalised_path(path: str) -> str | None:
    """The path with duplicate slashes and "." removed; None if it has ".." anywhere.

    Decoded repeatedly first: `%2e%2e` is ".." to whichever server or store receives it.
    """
    while (decoded := unquote(path)) != path:
        path = decoded
    if "\x00" in path or ".." in path.split("/"):
        return None
    normalised = posixpath.normpath(path) if path else ""
    return "" if normalised == "." else normalised.replace("//", "/")


def _without_credentials(parsed: SplitResult) -> str:
    netloc = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=netloc, query="", fragment="").geturl()


def _shown(parsed: SplitResult) -> str:
    text = _without_credentials(parsed)
    printable = "".join(ch if ch.isprintable() else "?" for ch in text)
    return f"'{printable[:200]}'"
