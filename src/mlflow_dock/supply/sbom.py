"""The CycloneDX (JSON, spec 1.5) bill of materials of one published image (pure).

Components: the base image (by digest where the engine knows it), every Python distribution
installed where the image's python looks (see `layers.python_site_dirs`), with version, licence
and the hashes we know, and the model (name, version, run id, source, the digest of the layer
that holds it). The image itself is ``metadata.component``.

Hashes: an installed distribution keeps no hash of the wheel it came from unless the installer
recorded one (``direct_url.json`` ``archive_info.hashes`` for URL installs); those become the
component's ``hashes``. RECORD lists a hash for every installed file; its own SHA-256 is kept as a
property, a fingerprint of exactly what was installed, without pretending to be the wheel's hash.

The document is deterministic for an image (timestamp = the image's creation time, serial number
derived from its digest), so a retried job attaches the very same bytes.

Where the distributions come from: the image's own layers (``supply/layers.py``) for images an
engine built; otherwise what the builder knows (:class:`KnownContents`): the distributions it
installed, read from its install directory with :func:`distribution_of`, the same reading of
the same files as a layer scan makes; or, for a version assembled on an earlier image, that
image's SBOM read back with :func:`read_cyclonedx`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import HeaderParser
from typing import Any, Final
from urllib.parse import quote, unquote

from mlflow_dock.supply.layers import FileRecord

__all__ = [
    "CYCLONEDX_MEDIA_TYPE",
    "BaseImage",
    "Distribution",
    "KnownContents",
    "ModelInfo",
    "NotOurSbom",
    "cyclonedx",
    "distribution_of",
    "installed_distributions",
    "read_cyclonedx",
]

CYCLONEDX_MEDIA_TYPE: Final = "application/vnd.cyclonedx+json"
SPEC_VERSION: Final = "1.5"
_PROP: Final = "mlflow-dock"
_NAMESPACE: Final = uuid.UUID("6f1c1f0e-9b5d-4a57-8a3e-6d6c6f636b00")
_HASH_ALGS: Final = {"sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512", "md5": "MD5"}
_MAX_LICENSE_NAME: Final = 200


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    site_dir: str
    licenses: tuple[dict[str, Any], ...] = ()
    hashes: tuple[tuple[str, str], ...] = ()  # (CycloneDX alg, hex)
    record_sha256: str | None = None
    installer: str | None = None

    @property
    def key(self) -> str:
        return canonical_name(self.name)

    @property
    def purl(self) -> str:
        return f"pkg:pypi/{quote(self.key, safe='')}@{quote(self.version, safe='')}"


@dataclass(frozen=True)
class BaseImage:
    reference: str
    digest: str | None = None  # a registry digest (RepoDigests) or the local image id


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    run_id: str | None = None
    source: str | None = None
    layer_digest: str | None = None


@dataclass(frozen=True)
class KnownContents:
    """What the builder knows an image holds: enough for its SBOM without reading a layer.

    The packages are ``distributions`` (what the image's python sees, as the native builder
    installed them) or, for a version assembled on an earlier image of the same runtime,
    those the SBOM of ``packages_of`` (that image's digest, same repository) lists.
    """

    model_layer: str | None  # the layer holding the model's MLmodel
    distributions: tuple[Distribution, ...] | None = None
    packages_of: str | None = None
    base: BaseImage | None = None  # with the registry digest the builder read it by


class NotOurSbom(ValueError):
    """An SBOM document that is not mlflow-dock's CycloneDX of the expected image."""


@dataclass(frozen=True)
class ImageInfo:
    repository: str  # host/path, no tag
    digest: str
    created: str | None = None
    tags: Sequence[str] = field(default_factory=tuple)


def canonical_name(name: str) -> str:
    """PEP 503 normalisation, which is how pip compares distribution names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _licenses(headers: Any) -> tuple[dict[str, Any], ...]:
    expression = (headers.get("License-Expression") or "").strip()
    if expression:
        return ({"expression": expression},)
    names = [
        c.rsplit("::", 1)[-1].strip()
        for c in headers.get_all("Classifier") or []
        if c.startswith("License ::") and c.count("::") >= 2
    ]
    if names:
        return tuple({"license": {"name": name}} for name in dict.fromkeys(names))
    text = (headers.get("License") or "").strip()
    # Some projects paste the whole licence text into this field; only a short name is useful.
    if text and "\n" not in text and len(text) <= _MAX_LICENSE_NAME and text.upper() != "UNKNOWN":
        return ({"license": {"name": text}},)
    return ()


def _archive_hashes(direct_url: str | None) -> tuple[tuple[str, str], ...]:
    if direct_url is None:
        return ()
    try:
        info = json.loads(direct_url).get("archive_info") or {}
    except (ValueError, AttributeError):
        return ()
    found: dict[str, str] = {}
    hashes = info.get("hashes")
    if isinstance(hashes, dict):
        found.update({str(k): str(v) for k, v in hashes.items()})
    legacy = info.get("hash")
    if isinstance(legacy, str) and "=" in legacy:
        alg, _, value = legacy.partition("=")
        found.setdefault(alg, value)
    return tuple(
        (_HASH_ALGS[alg], value.lower())
        for alg, value in sorted(found.items())
        if alg in _HASH_ALGS and re.fullmatch(r"[0-9a-fA-F]+", value)
    )


def installed_distributions(
    files: Mapping[str, FileRecord], site_dirs: Sequence[str]
) -> list[Distribution]:
    """Every distribution pip would list for these site dirs, first one found wins (as pip)."""
    found: dict[str, Distribution] = {}
    for site in site_dirs:
        prefix = site + "/"
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            meta_dir, _, leaf = rest.partition("/")
            if meta_dir.endswith(".dist-info") and leaf == "METADATA":
                kind = "dist-info"
            elif meta_dir.endswith(".egg-info") and leaf in {"PKG-INFO", ""}:
                kind = "egg-info"
            else:
                continue
            record = files[path]
            if record.kind != "file" or record.text is None:
                continue
            base = f"{prefix}{meta_dir}"
            record_file = files.get(f"{base}/RECORD") if kind == "dist-info" else None
            installer = files.get(f"{base}/INSTALLER")
            direct_url = files.get(f"{base}/direct_url.json")
            dist = distribution_of(
                record.text,
                site_dir=site,
                record_sha256=record_file.sha256 if record_file is not None else None,
                direct_url=direct_url.text if direct_url is not None else None,
                installer=installer.text if installer is not None else None,
            )
            if dist is not None:
                found.setdefault(dist.key, dist)
    return sorted(found.values(), key=lambda d: d.key)


def distribution_of(
    metadata: str,
    *,
    site_dir: str,
    record_sha256: str | None,
    direct_url: str | None = None,
    installer: str | None = None,
) -> Distribution | None:
    """One installed distribution from its METADATA (headers suffice) and the files beside it;
    None without a name or version. The one reading for layer scans and builder knowledge."""
    headers = HeaderParser().parsestr(metadata)
    name, version = headers.get("Name"), headers.get("Version")
    if not name or not version:
        return None
    return Distribution(
        name=name.strip(),
        version=version.strip(),
        site_dir=site_dir,
        licenses=_licenses(headers),
        hashes=_archive_hashes(direct_url),
        record_sha256=record_sha256,
        installer=(installer or "").strip() or None,
    )


def _props(pairs: Sequence[tuple[str, str | None]]) -> list[dict[str, str]]:
    return [{"name": f"{_PROP}:{name}", "value": value} for name, value in pairs if value]


def _oci_purl(repository: str, digest: str, tag: str | None = None) -> str:
    host_path = repository
    name = host_path.rsplit("/", 1)[-1]
    qualifiers = f"repository_url={quote(host_path, safe='/:')}"
    if tag:
        qualifiers += f"&tag={quote(tag, safe='')}"
    return f"pkg:oci/{quote(name, safe='')}@{quote(digest, safe='')}?{qualifiers}"


def _split_reference(reference: str) -> tuple[str, str | None]:
    """``host/a/b:tag`` -> (``host/a/b``, ``tag``); a digest reference keeps no tag."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = name.rpartition(":")
        return repo, tag
    return name, None


def _base_component(base: BaseImage) -> dict[str, Any]:
    repository, tag = _split_reference(base.reference)
    component: dict[str, Any] = {
        "type": "container",
        "bom-ref": "base-image",
        "name": repository,
    }
    if tag:
        component["version"] = tag
    digest = base.digest
    if digest and "@" in digest:
        # RepoDigests form "name@sha256:..": a registry manifest digest, what scanners want.
        digest_repo, _, manifest_digest = digest.partition("@")
        algo, _, value = manifest_digest.partition(":")
        component["purl"] = _oci_purl(digest_repo, manifest_digest, tag)
        component["hashes"] = [{"alg": _HASH_ALGS.get(algo, "SHA-256"), "content": value}]
        component["properties"] = _props([("base-image:manifest-digest", manifest_digest)])
    elif digest:
        # Only the engine's image id (config digest) is known: the base was built locally.
        component["properties"] = _props([("base-image:image-id", digest)])
    return component


def _model_component(model: ModelInfo) -> dict[str, Any]:
    component: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": "model",
        "name": model.name,
        "version": model.version,
        "properties": _props(
            [
                ("model:run-id", model.run_id),
                ("model:source", model.source),
                ("model:layer-digest", model.layer_digest),
            ]
        ),
    }
    if model.layer_digest and model.layer_digest.startswith("sha256:"):
        component["hashes"] = [{"alg": "SHA-256", "content": model.layer_digest[7:]}]
    return component


def _distribution_component(dist: Distribution) -> dict[str, Any]:
    component: dict[str, Any] = {
        "type": "library",
        "bom-ref": dist.purl,
        "name": dist.name,
        "version": dist.version,
        "purl": dist.purl,
    }
    if dist.licenses:
        component["licenses"] = list(dist.licenses)
    if dist.hashes:
        component["hashes"] = [{"alg": alg, "content": value} for alg, value in dist.hashes]
    component["properties"] = _props(
        [
            ("python:site-packages", "/" + dist.site_dir),
            ("python:record-sha256", dist.record_sha256),
            ("python:installer", dist.installer),
        ]
    )
    return component


def cyclonedx(
    *,
    image: ImageInfo,
    distributions: Sequence[Distribution],
    base: BaseImage | None,
    model: ModelInfo | None,
    tool_version: str,
) -> bytes:
    """The SBOM document's bytes (compact JSON, stable key order)."""
    tag = image.tags[0] if image.tags else None
    components: list[dict[str, Any]] = []
    refs: list[str] = []
    if base is not None:
        components.append(_base_component(base))
        refs.append("base-image")
    if model is not None:
        components.append(_model_component(model))
        refs.append("model")
    for dist in distributions:
        components.append(_distribution_component(dist))
        refs.append(dist.purl)
    metadata: dict[str, Any] = {
        "tools": {
            "components": [{"type": "application", "name": "mlflow-dock", "version": tool_version}]
        },
        "component": {
            "type": "container",
            "bom-ref": "image",
            "name": image.repository,
            "version": image.digest,
            "purl": _oci_purl(image.repository, image.digest, tag),
            "hashes": [{"alg": "SHA-256", "content": image.digest.removeprefix("sha256:")}],
        },
    }
    if image.created:
        metadata = {"timestamp": image.created, **metadata}
    doc = {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(_NAMESPACE, image.digest)}",
        "version": 1,
        "metadata": metadata,
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": refs}],
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_cyclonedx(document: bytes, *, image_digest: str) -> tuple[list[Distribution], BaseImage]:
    """The distributions and base image an SBOM of :func:`cyclonedx` lists for ``image_digest``.

    The inverse of :func:`cyclonedx` for what a later version of the same runtime shares with
    that image. Raises :class:`NotOurSbom` for anything else (another tool's SBOM, another
    image's, unreadable JSON): the caller then reads the image's layers instead.
    """
    try:
        doc = json.loads(document)
        component = doc["metadata"]["component"]
        tools = doc["metadata"]["tools"]["components"]
        components = doc["components"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NotOurSbom(f"not a CycloneDX document of this tool: {exc}") from exc
    if doc.get("bomFormat") != "CycloneDX" or not any(
        isinstance(t, dict) and t.get("name") == "mlflow-dock" for t in tools
    ):
        raise NotOurSbom("not an mlflow-dock CycloneDX document")
    if component.get("version") != image_digest:
        raise NotOurSbom(f"it describes {component.get('version')!r}, not {image_digest}")
    distributions: list[Distribution] = []
    base = BaseImage(reference="")
    for item in components if isinstance(components, list) else []:
        if not isinstance(item, dict):
            continue
        props = {
            str(p.get("name", "")).removeprefix(f"{_PROP}:"): str(p.get("value", ""))
            for p in item.get("properties") or []
            if isinstance(p, dict)
        }
        if item.get("bom-ref") == "base-image":
            base = _base_of(item, props)
        elif item.get("type") == "library":
            distributions.append(
                Distribution(
                    name=str(item["name"]),
                    version=str(item["version"]),
                    site_dir=props.get("python:site-packages", "").lstrip("/"),
                    licenses=tuple(item.get("licenses") or ()),
                    hashes=tuple(
                        (str(h["alg"]), str(h["content"])) for h in item.get("hashes") or ()
                    ),
                    record_sha256=props.get("python:record-sha256"),
                    installer=props.get("python:installer"),
                )
            )
    return distributions, base


def _base_of(item: Mapping[str, Any], props: Mapping[str, str]) -> BaseImage:
    """The :class:`BaseImage` a base component was written from (see :func:`_base_component`)."""
    reference = str(item.get("name", ""))
    if item.get("version"):
        reference += f":{item['version']}"
    manifest_digest = props.get("base-image:manifest-digest")
    if manifest_digest:
        # Its purl says which repository the digest is of (the RepoDigests form).
        purl = str(item.get("purl", ""))
        _, _, query = purl.partition("?")
        repository = next(
            (
                unquote(value)
                for key, _, value in (part.partition("=") for part in query.split("&"))
                if key == "repository_url"
            ),
            reference,
        )
        return BaseImage(reference, f"{repository}@{manifest_digest}")
    return BaseImage(reference, props.get("base-image:image-id"))
