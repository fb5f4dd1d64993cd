"""How MLflow model names, versions and aliases become OCI image references.

Model version N of a registered model becomes ``{registry}/{namespace}/{repository}:{N}`` and
every alias of that version becomes one more tag on the same repository. The OCI distribution
grammar limits what we may emit:

- a path component is ``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*``;
- a tag is ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``;
- the whole name (host and path, without tag or digest) is at most 255 characters.

Repository (from the free-text model name):

- Unicode NFKD normalise, drop combining marks ("Modèle" -> "modele"), lowercase, replace every
  run of characters outside ``[a-z0-9]`` (spaces, "/", ".", "_", ...) with one "-", and strip
  leading and trailing "-". This is the *stem*. It is capped at 100 characters, cut so it does not
  end in "-". An empty stem (a name such as "模型" or "!!!") becomes "model".
- If the stem equals the model name exactly and the name does not itself end in the hash-suffix
  pattern ``-[0-9a-f]{10}``, the repository is the name unchanged ("fraud-model" -> "fraud-model").
- Otherwise the repository is the stem, "-", and the first 10 hex digits of the SHA-256 of the
  model name as UTF-8 ("Fraud Model" -> "fraud-model-<hash>", "Iris Classifier" ->
  "iris-classifier-<hash>").
- So two different model names never share a repository: names kept unchanged never end in the
  hash-suffix pattern, hashed ones always do, and among hashed ones the hash tells them apart.
- Names mlflow-dock writes itself are reserved: a stem that is ``mlflow-dock`` or starts with
  ``mlflow-dock-`` is always hashed ("mlflow-dock-base" -> "mlflow-dock-base-<hash>"), and the
  service's own repositories (derived bases, caches: :func:`service_repository`) never end in
  the hash-suffix pattern, so no model can write into them.

Version tag: MLflow versions are positive integers; the tag is the decimal number without leading
zeros ("7" and 7 -> "7"). Anything else is refused with ``ValueError``.

Alias tag (aliases and tags are both case-sensitive, so case is kept):

- An alias that is a valid tag, is not all digits and does not end in ``-[0-9a-f]{10}`` is the tag
  unchanged ("champion" -> "champion").
- Otherwise the tag is a readable stem, "-", and the first 10 hex digits of the SHA-256 of the
  alias as UTF-8. The stem of an all-digit alias is "alias-<digits>" ("5" -> "alias-5-<hash>"), so
  it can never be mistaken for version 5. Any other stem is the alias NFKD-normalised without
  combining marks, each run of characters outside ``[A-Za-z0-9._-]`` replaced with "-", leading
  "." and "-" stripped, cut to fit the 128-character limit, and "alias" if nothing is left.
- An alias tag is therefore never all digits (so never a version tag), and different aliases get
  different tags by the same argument as for repositories.
- Tags mlflow-dock writes itself are reserved the same way: an alias starting with ``sha256-``
  (the OCI referrers fallback ``sha256-<hex>`` and cosign's ``sha256-<hex>.sig``/``.att``/
  ``.sbom``) or ending in ``-modelcar`` (:func:`modelcar_tag`) is hashed, never taken as is;
  the stem of the former gets "alias-" in front, so no alias tag starts with ``sha256-``.

Namespace: Docker Hub (docker.io, index.docker.io, registry-1.docker.io) and ghcr.io refuse
repositories without an owner, so there the default namespace is the registry username, lowercased
and sanitised to one path component, unless the registry setting already carries a path
("ghcr.io/my-org"). Other registries get no default namespace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

from mlflow_dock.errors import ConfigError

__all__ = [
    "DIGEST_RE",
    "DOCKER_HUB_API_HOST",
    "DOCKER_HUB_HOSTS",
    "REPOSITORY_RE",
    "SERVICE_PREFIX",
    "TAG_RE",
    "ImageRef",
    "alias_tag",
    "default_namespace",
    "image_repository",
    "is_digest",
    "is_loopback",
    "modelcar_tag",
    "pinned",
    "registry_hostname",
    "repository_name",
    "service_repository",
    "split_host",
    "split_registry",
    "version_tag",
]

MAX_NAME_LENGTH = 255
MAX_TAG_LENGTH = 128
MAX_STEM_LENGTH = 100
HASH_LENGTH = 10

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
COMPONENT_RE = re.compile(_COMPONENT)
# A repository path inside a registry: components joined by "/". Validating before building
# URLs also keeps "..", "?" or "#" in a name from turning into a different request.
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# The OCI digest grammar (algorithm ":" encoded); the registered algorithms also fix the
# encoded length, checked by `is_digest`.
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
_REGISTERED_DIGESTS = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}
# Host grammar of the distribution reference library: DNS labels or a bracketed IPv6 address,
# optionally with a port.
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
HOST_RE = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
HASH_SUFFIX_RE = re.compile(rf"-[0-9a-f]{{{HASH_LENGTH}}}\Z")

_REPO_INVALID_RUN_RE = re.compile(r"[^a-z0-9]+")
_TAG_INVALID_RUN_RE = re.compile(r"[^A-Za-z0-9._-]+")
_DIGITS_RE = re.compile(r"[0-9]+")
_SCHEME_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*://")

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# Where Docker Hub's registry API really answers, whichever of its names the user wrote.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
# Registries that reject a repository directly under the host: an owner path is mandatory.
OWNER_REQUIRED_HOSTS = DOCKER_HUB_HOSTS | {"ghcr.io"}

_FALLBACK_REPOSITORY_STEM = "model"
_FALLBACK_ALIAS_STEM = "alias"

# Repositories mlflow-dock itself writes start with this; no model name maps onto them.
SERVICE_PREFIX = "mlflow-dock"
# The tag beside a version's (or alias's) serving image for its KServe Modelcar image.
MODELCAR_SUFFIX = "-modelcar"
# Tags the supply chain writes next to an image: `sha256-<hex>` (the OCI 1.1 referrers
# fallback) and cosign's `sha256-<hex>.sig`, `.att`, `.sbom`.
_ATTACHMENT_TAG_PREFIX = "sha256-"


def _reserved_repository(name: str) -> bool:
    return name == SERVICE_PREFIX or name.startswith(SERVICE_PREFIX + "-")


def _reserved_tag(tag: str) -> bool:
    lowered = tag.lower()
    return lowered.startswith(_ATTACHMENT_TAG_PREFIX) or lowered.endswith(MODELCAR_SUFFIX)


def _short_hash(text: str) -> str:
    # surrogatepass: a JSON payload can smuggle in lone surrogates; they must still hash (and
    # hash differently from every other string) instead of crashing the job.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:HASH_LENGTH]


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _repository_stem(model_name: str) -> str:
    stem = _REPO_INVALID_RUN_RE.sub("-", _strip_accents(model_name).lower()).strip("-")
    stem = stem[:MAX_STEM_LENGTH].rstrip("-")
    return stem or _FALLBACK_REPOSITORY_STEM


def repository_name(model_name: str) -> str:
    """The repository path component for an MLflow model name; distinct names never collide."""
    stem = _repository_stem(model_name)
    if (
        stem == model_name
        and not HASH_SUFFIX_RE.search(model_name)
        and not _reserved_repository(model_name)
    ):
        return model_name
    return f"{stem}-{_short_hash(model_name)}"


def version_tag(version: str | int) -> str:
    """The tag for an MLflow model version ("3" or 3 -> "3")."""
    # bool is an int subclass; True is certainly not version 1.
    if isinstance(version, bool):
        raise ValueError(f"not a model version: {version!r}")
    if isinstance(version, int):
        number = version
    elif isinstance(version, str) and _DIGITS_RE.fullmatch(version):
        # Length check first: int() of thousands of digits is slow and itself refused by Python.
        if len(version.lstrip("0")) > MAX_TAG_LENGTH:
            raise ValueError(f"model version too long for a tag: {version[:20]!r}...")
        number = int(version)
    else:
        raise ValueError(f"not a model version: {version!r}")
    if number < 1:
        raise ValueError(f"model versions start at 1, got {version!r}")
    tag = str(number)
    if len(tag) > MAX_TAG_LENGTH:
        raise ValueError(f"model version too long for a tag: {tag[:20]!r}...")
    return tag


def alias_tag(alias: str) -> str:
    """The tag for an MLflow alias; never a version tag, distinct aliases never collide."""
    is_digits = _DIGITS_RE.fullmatch(alias) is not None
    if (
        TAG_RE.fullmatch(alias)
        and not is_digits
        and not HASH_SUFFIX_RE.search(alias)
        and not _reserved_tag(alias)
    ):
        return alias
    if is_digits:
        stem = f"{_FALLBACK_ALIAS_STEM}-{alias}"
    else:
        stem = _TAG_INVALID_RUN_RE.sub("-", _strip_accents(alias)).lstrip(".-")
        if stem.lower().startswith(_ATTACHMENT_TAG_PREFIX):
            # Even hashed, a tag that starts like an attachment tag is one guess away from one.
            stem = f"{_FALLBACK_ALIAS_STEM}-{stem}"
    stem = stem[: MAX_TAG_LENGTH - HASH_LENGTH - 1].rstrip(".-")
    return f"{stem or _FALLBACK_ALIAS_STEM}-{_short_hash(alias)}"


def modelcar_tag(tag: str) -> str:
    """The Modelcar image's tag beside the serving image's ``tag`` (a version or alias tag).

    Never an alias tag (aliases ending in the suffix are hashed) and distinct for distinct tags;
    a tag too long for the suffix keeps a prefix and a hash of the whole.
    """
    if len(tag) + len(MODELCAR_SUFFIX) <= MAX_TAG_LENGTH:
        return tag + MODELCAR_SUFFIX
    keep = MAX_TAG_LENGTH - len(MODELCAR_SUFFIX) - HASH_LENGTH - 1
    return f"{tag[:keep].rstrip('.-')}-{_short_hash(tag)}{MODELCAR_SUFFIX}"


def split_registry(registry: str) -> tuple[str, str]:
    """Split a registry setting into host and path prefix.

    "us-central1-docker.pkg.dev/proj/repo" -> ("us-central1-docker.pkg.dev", "proj/repo");
    "https://127.0.0.1:5000/" -> ("127.0.0.1:5000", "").
    """
    # People paste registry URLs from their browser; the scheme means nothing to a reference.
    rest = _SCHEME_RE.sub("", registry.strip()).rstrip("/")
    host, _, prefix = rest.partition("/")
    return host, prefix


def split_host(host: str) -> tuple[str, int | None]:
    """``"[::1]:5000"`` -> ("::1", 5000); ``"::1"`` -> ("::1", None); ``"h:80"`` -> ("h", 80)."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError(f"invalid registry host {host!r}")
        name, rest = host[1:end], host[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid registry host {host!r}")
        port = rest[1:] or None
    elif host.count(":") > 1:  # a bare IPv6 address cannot carry a port
        name, port = host, None
    else:
        name, _, port_text = host.partition(":")
        port = port_text or None
    if not name or (port is not None and not port.isdigit()):
        raise ValueError(f"invalid registry host {host!r}")
    return name, int(port) if port is not None else None


def registry_hostname(registry: str) -> str:
    """The lower-case host name, without port or path, of a registry setting."""
    host, _ = split_registry(registry)
    try:
        return split_host(host)[0].lower()
    except ValueError:
        return host.lower()


def is_loopback(hostname: str) -> bool:
    if hostname.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def is_digest(value: str) -> bool:
    """A well-formed OCI digest; sha256/sha512 must also have their exact hex length."""
    if not DIGEST_RE.fullmatch(value):
        return False
    algorithm, _, encoded = value.partition(":")
    rule = _REGISTERED_DIGESTS.get(algorithm)
    return rule is None or rule.fullmatch(encoded) is not None


def pinned(image: str, digest: str) -> str:
    """``"host/repo:3"`` + digest -> ``"host/repo@sha256:..."``: the reference that cannot move."""
    return str(ImageRef.parse(image).without_tag().with_digest(digest))


def default_namespace(registry: str, username: str) -> str:
    """The namespace to use when none is configured: the username where an owner is mandatory."""
    host, prefix = split_registry(registry)
    # Docker Hub allows exactly owner/repository, so an owner in the registry setting is enough.
    if host.lower() not in OWNER_REQUIRED_HOSTS or prefix:
        return ""
    namespace = _REPO_INVALID_RUN_RE.sub("-", username.lower()).strip("-")
    if not namespace:
        raise ConfigError(
            f"{host} needs a namespace: set a registry username or an explicit namespace "
            f"(got username {username!r})"
        )
    return namespace


def _invalid_components(path: str) -> list[str]:
    return [part for part in path.split("/") if not COMPONENT_RE.fullmatch(part)]


def _validate_name(name: str) -> None:
    """Raise ValueError unless `name` is a valid host/path repository reference without tag."""
    host, sep, path = name.partition("/")
    if not sep or not path:
        raise ValueError(f"repository {name!r} has no path after the host")
    if not HOST_RE.fullmatch(host):
        raise ValueError(f"invalid registry host {host!r} in {name!r}")
    bad = _invalid_components(path)
    if bad:
        raise ValueError(f"invalid path component(s) {bad!r} in {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"repository {name[:40]!r}... is {len(name)} characters, over 255")


def image_repository(registry: str, namespace: str, model_name: str) -> str:
    """The full repository reference (no tag) for a model: host[/prefix][/namespace]/name."""
    return _full_repository(registry, namespace, repository_name(model_name))


def service_repository(registry: str, namespace: str, name: str) -> str:
    """A repository mlflow-dock itself owns (``mlflow-dock-base``, ...), beside the models'.

    Its name is reserved: :func:`repository_name` maps no model name onto it.
    """
    if not _reserved_repository(name) or HASH_SUFFIX_RE.search(name):
        raise ValueError(f"{name!r} is not a reserved service repository name")
    return _full_repository(registry, namespace, name)


def _full_repository(registry: str, namespace: str, repository: str) -> str:
    host, prefix = split_registry(registry)
    if not HOST_RE.fullmatch(host):
        raise ConfigError(f"registry {registry!r}: {host!r} is not a valid registry host")
    if prefix and (bad := _invalid_components(prefix)):
        raise ConfigError(
            f"registry {registry!r}: invalid path component(s) {bad!r}; components must match "
            f"{COMPONENT_RE.pattern}"
        )
    if namespace and (bad := _invalid_components(namespace)):
        raise ConfigError(
            f"namespace {namespace!r}: invalid path component(s) {bad!r}; components must match "
            f"{COMPONENT_RE.pattern}"
        )
    owner = "/".join(part for part in (prefix, namespace) if part)
    # Pushing to docker.io/<repo> would target the official "library" images and be denied
    # much later with an opaque error; refuse it while it is still a configuration problem.
    if not owner and host.lower() in OWNER_REQUIRED_HOSTS:
        raise ConfigError(f"registry {host!r} requires a namespace (an owner such as a username)")
    name = "/".join(part for part in (host, owner, repository) if part)
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"image repository {name[:60]!r}... is {len(name)} characters; the limit is "
            f"{MAX_NAME_LENGTH}. Use a shorter registry path or namespace."
        )
    return name


@dataclass(frozen=True)
class ImageRef:
    """A repository ("host/path") with an optional tag and an optional sha256 digest."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        _validate_name(self.repository)
        if self.tag is not None and not TAG_RE.fullmatch(self.tag):
            raise ValueError(f"invalid tag {self.tag!r}")
        if self.digest is not None and not is_digest(self.digest):
            raise ValueError(f"invalid digest {self.digest!r}; expected sha256:<64 hex digits>")

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def host(self) -> str:
        return self.repository.partition("/")[0]

    @property
    def path(self) -> str:
        return self.repository.partition("/")[2]

    @classmethod
    def parse(cls, reference: str) -> ImageRef:
        """``host[:port]/path[:tag][@digest]``; raises ValueError for anything else."""
        rest, _, digest = reference.partition("@")
        slash = rest.find("/")
        colon = rest.rfind(":")
        # A colon after the last "/" starts the tag; one before it belongs to host:port.
        if colon > rest.rfind("/") and slash != -1:
            return cls(rest[:colon], tag=rest[colon + 1 :], digest=digest or None)
        return cls(rest, digest=digest or None)

    def with_tag(self, tag: str) -> ImageRef:
        return dataclasses.replace(self, tag=tag)

    def without_tag(self) -> ImageRef:
        return dataclasses.replace(self, tag=None)

    def with_digest(self, digest: str) -> ImageRef:
        return dataclasses.replace(self, digest=digest)
