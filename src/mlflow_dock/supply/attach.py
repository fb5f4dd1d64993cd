"""Attaching the SBOM, signature and provenance to a published image (registry I/O).

`SupplyChain.attach` runs once per published version, after its digest is known:

1. list the Python distributions where the image's python looks: from what the builder knows
   when it says (`sbom.KnownContents`: the distributions the native builder installed, or the
   SBOM of the earlier image a version was assembled on, a small JSON), in milliseconds; for
   an image an engine built, from the image's own layers (read once per layer digest as
   streams, cached: `layers`, `sbom`);
2. push the artifacts as OCI 1.1 manifests whose ``subject`` is the image: the CycloneDX SBOM
   always; with a signing key also cosign's simple-signing signature and the SLSA provenance in
   a DSSE envelope (`signing`, `provenance`);
3. make them findable: cosign's tags ``sha256-<hex>.sig`` / ``.att`` / ``.sbom`` always (cosign
   looks there unless told to use OCI 1.1 referrers), and on registries without the referrers
   API the OCI 1.1 fallback index tagged ``sha256-<hex>`` (`mlflow_dock.oci.referrers`).

Alias tags are put on the version's digest later, so they point at exactly what was signed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, cast

from mlflow_dock.errors import PermanentError
from mlflow_dock.jobs.model import JobOutcome, LogSink
from mlflow_dock.oci import referrers
from mlflow_dock.oci.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
)
from mlflow_dock.oci.reference import ImageRef
from mlflow_dock.oci.referrers import Artifact, Descriptor
from mlflow_dock.oci.remote import RegistryClient, RegistryPermanentError
from mlflow_dock.supply import layers, sbom
from mlflow_dock.supply.provenance import (
    DSSE_MEDIA_TYPE,
    SLSA_PREDICATE_TYPE,
    BuildFacts,
    dsse_envelope,
    encode_statement,
    pae,
    statement,
)
from mlflow_dock.supply.signing import (
    SIGNATURE_ANNOTATION,
    SIMPLE_SIGNING_MEDIA_TYPE,
    Signer,
    simple_signing_payload,
)

__all__ = ["Attached", "SupplyChain", "SupplyError"]

logger = logging.getLogger(__name__)

# artifactType values: cosign's for its signature and attestation artifacts, IANA's CycloneDX.
SIGNATURE_ARTIFACT_TYPE: Final = "application/vnd.dev.cosign.artifact.sig.v1+json"
ATTESTATION_ARTIFACT_TYPE: Final = DSSE_MEDIA_TYPE
# Marks our own entries in a shared referrers index, so a retry replaces them.
KIND_ANNOTATION: Final = "dev.mlflow-dock.artifact"
_MODEL_FILE: Final = "opt/ml/model/MLmodel"
# An earlier image's SBOM is read whole (JSON); one bigger than this is not ours to trust.
_MAX_SBOM: Final = 64 << 20

RegistryFactory = Callable[[str], RegistryClient]
BaseResolver = Callable[[str], "str | None"]
DeliveryLookup = Callable[[str], "str | None"]


class SupplyError(PermanentError):
    """The image cannot be described (e.g. a layer format we cannot read)."""


@dataclass(frozen=True)
class Attached:
    sbom: str
    signature: str | None
    provenance: str | None
    packages: int
    source: str  # where the package list came from, for the log


@dataclass(frozen=True)
class _Known:
    """Builder knowledge, resolved: the packages themselves."""

    distributions: tuple[sbom.Distribution, ...]
    model_layer: str | None
    base: sbom.BaseImage | None
    source: str


class _ScanCache:
    """Layer scans by layer digest: in memory, and as small JSON files if given a directory."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._memory: dict[str, layers.LayerScan] = {}
        self._lock = threading.Lock()

    def _path(self, digest: str) -> Path | None:
        if self._directory is None:
            return None
        return self._directory / (digest.replace(":", "-") + ".json")

    def get(self, digest: str) -> layers.LayerScan | None:
        with self._lock:
            if digest in self._memory:
                return self._memory[digest]
        path = self._path(digest)
        if path is None or not path.is_file():
            return None
        scan = layers.LayerScan.from_json(path.read_bytes())
        if scan is not None:
            with self._lock:
                self._memory[digest] = scan
        return scan

    def put(self, digest: str, scan: layers.LayerScan) -> None:
        with self._lock:
            self._memory[digest] = scan
        path = self._path(digest)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: a crash never leaves a half file to be trusted later.
        # A name of its own per writer: workers sharing the data directory scan the same
        # layers at the same time (one fixed .partial name made the slower rename fail).
        partial = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.partial")
        partial.write_bytes(scan.to_json())
        partial.replace(path)


class SupplyChain:
    """Describes, signs and attaches; one instance per service, safe across worker threads."""

    def __init__(
        self,
        *,
        registry_factory: RegistryFactory,
        signer: Signer | None,
        tool_version: str,
        cache_dir: Path | None = None,
        resolve_base: BaseResolver | None = None,
        first_delivery: DeliveryLookup | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry_factory = registry_factory
        self._signer = signer
        self._version = tool_version
        self._cache = _ScanCache(cache_dir)
        self._resolve_base = resolve_base
        self._first_delivery = first_delivery
        self._clock = clock
        # One layer read at a time: concurrent versions of a model share their runtime layers,
        # and reading a layer twice at once would only double the traffic.
        self._scan_lock = threading.Lock()

    @property
    def signing(self) -> bool:
        return self._signer is not None

    def attach(
        self,
        target: ImageRef,
        outcome: JobOutcome,
        log: LogSink,
        *,
        model_name: str,
        model_version: str,
        run_id: str | None,
        model_source: str | None,
        requirements_sha256: str,
        base_image: str,
        builder: str,
        job_id: str | None = None,
        contents: sbom.KnownContents | None = None,
    ) -> JobOutcome:
        """Attach everything to ``outcome.digest`` in ``target``; the outcome with references.

        ``contents``: what the builder knows the image holds; without it (an engine built the
        image) the packages are read from the image's layers.
        """
        started = self._clock()
        with self._registry_factory(target.host) as registry:
            known = None if contents is None else self._known(registry, target, contents, log)
            base = known.base if known is not None else None
            facts = self._complete(
                BuildFacts(
                    model_name=model_name,
                    model_version=model_version,
                    run_id=run_id,
                    model_source=model_source,
                    requirements_sha256=requirements_sha256,
                    base_image=base_image,
                    base_image_digest=base.digest if base is not None else None,
                    builder=builder,
                    mlflow_dock_version=self._version,
                    job_id=job_id,
                )
            )
            attached = self._attach(registry, target, outcome, facts, log, known)
        log(
            f"attached SBOM ({attached.packages} Python packages, {attached.source}) "
            f"{attached.sbom}"
            + (f", signature {attached.signature}" if attached.signature else ", unsigned")
            + (f", provenance {attached.provenance}" if attached.provenance else "")
            + f" in {self._clock() - started:.1f} s"
        )
        return dataclasses.replace(
            outcome,
            sbom=attached.sbom,
            signature=attached.signature,
            provenance=attached.provenance,
        )

    def _complete(self, facts: BuildFacts) -> BuildFacts:
        base_digest = facts.base_image_digest
        if base_digest is None and self._resolve_base is not None:
            try:
                base_digest = self._resolve_base(facts.base_image)
            except Exception as exc:  # the SBOM is still worth having without it
                logger.warning("could not resolve base image %s: %s", facts.base_image, exc)
        event, deliveries = facts.event, tuple(facts.delivery_ids)
        if not deliveries and facts.job_id and self._first_delivery is not None:
            try:
                delivery = self._first_delivery(facts.job_id)
            except Exception as exc:
                logger.warning("could not look up the delivery of job %s: %s", facts.job_id, exc)
                delivery = None
            if delivery:
                deliveries = (delivery,)
                # Only model_version.created deliveries create build jobs.
                event = event or "model_version.created"
        return dataclasses.replace(
            facts,
            base_image_digest=base_digest,
            mlflow_dock_version=facts.mlflow_dock_version or self._version,
            event=event,
            delivery_ids=deliveries,
            finished_on=facts.finished_on or datetime.now(UTC).isoformat(timespec="seconds"),
        )

    # -- describing -----------------------------------------------------------------------

    def _known(
        self,
        registry: RegistryClient,
        target: ImageRef,
        contents: sbom.KnownContents,
        log: LogSink,
    ) -> _Known | None:
        """The builder's knowledge with the packages resolved; None: read the layers instead."""
        if contents.distributions is not None:
            return _Known(
                tuple(contents.distributions), contents.model_layer, contents.base, "as built"
            )
        earlier = contents.packages_of
        if earlier is None:
            return None
        try:
            distributions, base = self._earlier_sbom(registry, target.path, earlier)
        except (SupplyError, sbom.NotOurSbom) as exc:
            log(f"the SBOM of {earlier} cannot be reused ({exc}); reading the image's layers")
            return None
        return _Known(
            tuple(distributions),
            contents.model_layer,
            contents.base or base,
            f"those of {earlier[:19]}'s SBOM",
        )

    def _earlier_sbom(
        self, registry: RegistryClient, path: str, digest: str
    ) -> tuple[list[sbom.Distribution], sbom.BaseImage]:
        """What the SBOM attached to ``digest`` (found by cosign's tag) lists."""
        try:
            manifest = registry.get_manifest(path, referrers.cosign_tag(digest, "sbom"))
        except RegistryPermanentError as exc:
            if exc.status_code != 404:
                raise
            raise SupplyError("it has none") from exc
        doc = _json(manifest.body, f"SBOM manifest of {digest}")
        if (doc.get("subject") or {}).get("digest") != digest:
            raise SupplyError("its .sbom tag names another image's SBOM")
        layer = next(
            (
                d
                for d in doc.get("layers") or []
                if isinstance(d, dict) and d.get("mediaType") == sbom.CYCLONEDX_MEDIA_TYPE
            ),
            None,
        )
        if layer is None or int(layer.get("size") or 0) > _MAX_SBOM:
            raise SupplyError("no CycloneDX document of a sensible size")
        document = registry.get_blob(path, _descriptor_digest(layer, "layer"))
        return sbom.read_cyclonedx(document, image_digest=digest)

    def _scan(
        self, registry: RegistryClient, path: str, digest: str, size: int | None
    ) -> layers.LayerScan:
        cached = self._cache.get(digest)
        if cached is not None:
            return cached
        with self._scan_lock:
            cached = self._cache.get(digest)
            if cached is not None:
                return cached
            # Streamed (a model's weights run to GBs), and read to its end: the digest is checked.
            with registry.open_blob(path, digest, size) as blob:
                try:
                    scan = layers.scan_layer(cast(IO[bytes], blob))
                except layers.LayerScanError as exc:
                    raise SupplyError(f"cannot read layer {digest} of {path}: {exc}") from exc
                while blob.read(1 << 20):
                    pass
            self._cache.put(digest, scan)
            return scan

    def describe(
        self,
        registry: RegistryClient,
        target: ImageRef,
        image: Manifest,
        facts: BuildFacts,
        *,
        tag: str | None = None,
        known: _Known | None = None,
    ) -> tuple[bytes, int]:
        """The SBOM document for ``image`` and how many Python distributions it lists.

        For a multi-platform index the packages are those of its first linux/amd64 image (or its
        first image): the platforms of one version are built from the same requirements.
        ``known``: the packages and model layer as the builder knows them; else the image's
        layers are read.
        """
        doc = _json(image.body, f"manifest {image.digest}")
        if image.media_type in {OCI_INDEX, DOCKER_MANIFEST_LIST}:
            child = _platform_image(doc)
            if child is None:
                raise SupplyError(f"{target.repository}@{image.digest} is an index of no images")
            doc = _json(registry.get_manifest(target.path, child).body, f"manifest {child}")
        elif image.media_type not in {OCI_MANIFEST, DOCKER_MANIFEST}:
            raise SupplyError(
                f"{target.repository}@{image.digest} is a {image.media_type}, not an image"
            )
        config_digest = _descriptor_digest(doc.get("config"), "config")
        config = _json(registry.get_blob(target.path, config_digest), "image config")
        if known is not None:
            distributions: Sequence[sbom.Distribution] = known.distributions
            model_layer = known.model_layer
        else:
            distributions, model_layer = self._read_layers(registry, target, doc, config)
        document = sbom.cyclonedx(
            image=sbom.ImageInfo(
                repository=target.repository,
                digest=image.digest,
                created=config.get("created") if isinstance(config.get("created"), str) else None,
                tags=(tag,) if tag else (),
            ),
            distributions=distributions,
            base=sbom.BaseImage(facts.base_image, facts.base_image_digest),
            model=sbom.ModelInfo(
                name=facts.model_name,
                version=facts.model_version,
                run_id=facts.run_id,
                source=facts.model_source,
                layer_digest=model_layer,
            ),
            tool_version=facts.mlflow_dock_version,
        )
        return document, len(distributions)

    def _read_layers(
        self,
        registry: RegistryClient,
        target: ImageRef,
        doc: dict[str, Any],
        config: dict[str, Any],
    ) -> tuple[list[sbom.Distribution], str | None]:
        """The distributions and the model's layer, read from the image's own layers."""
        descriptors = [d for d in doc.get("layers") or [] if isinstance(d, dict)]
        layer_digests = [_descriptor_digest(d, "layer") for d in descriptors]
        scans = [
            self._scan(registry, target.path, digest, _size(descriptor))
            for digest, descriptor in zip(layer_digests, descriptors, strict=True)
        ]
        files = layers.merge_layers(scans)
        env = (config.get("config") or {}).get("Env") or []
        path_env = next((e[5:] for e in env if isinstance(e, str) and e.startswith("PATH=")), "")
        site_dirs = layers.python_site_dirs(files, path_env)
        model_layer = next(
            (
                d
                for d, s in zip(reversed(layer_digests), reversed(scans), strict=True)
                if _MODEL_FILE in s.files
            ),
            None,
        )
        return sbom.installed_distributions(files, site_dirs), model_layer

    # -- attaching ------------------------------------------------------------------------

    def _attach(
        self,
        registry: RegistryClient,
        target: ImageRef,
        outcome: JobOutcome,
        facts: BuildFacts,
        log: LogSink,
        known: _Known | None = None,
    ) -> Attached:
        path, digest = target.path, outcome.digest
        image = registry.get_manifest(path, digest)
        subject = Descriptor(image.media_type, image.digest, len(image.body))
        try:
            tag = ImageRef.parse(outcome.image).tag
        except ValueError:
            tag = None
        document, packages = self.describe(registry, target, image, facts, tag=tag, known=known)
        registry.upload_blob(path, referrers.EMPTY_CONFIG)

        pushed: list[tuple[str, Manifest]] = []
        sbom_artifact = Artifact(
            artifact_type=sbom.CYCLONEDX_MEDIA_TYPE,
            media_type=sbom.CYCLONEDX_MEDIA_TYPE,
            data=document,
            annotations={KIND_ANNOTATION: "sbom"},
        )
        sbom_manifest = self._push(registry, path, [sbom_artifact], subject)
        pushed.append(("sbom", sbom_manifest))

        signature_manifest = attestation_manifest = None
        if self._signer is not None:
            signature_manifest = self._signature(registry, target, subject)
            pushed.append(("sig", signature_manifest))
            attestation_manifest = self._attestation(registry, target, subject, facts)
            pushed.append(("att", attestation_manifest))

        for suffix, manifest in pushed:
            registry.put_manifest(path, referrers.cosign_tag(digest, suffix), manifest)
        if self._referrers_api(registry, path, digest):
            log("registry indexes referrers itself (OCI 1.1 referrers API)")
        else:
            self._update_fallback_index(registry, path, digest, [m for _, m in pushed])

        def ref(manifest: Manifest | None) -> str | None:
            return f"{target.repository}@{manifest.digest}" if manifest is not None else None

        return Attached(
            sbom=f"{target.repository}@{sbom_manifest.digest}",
            signature=ref(signature_manifest),
            provenance=ref(attestation_manifest),
            packages=packages,
            source=known.source if known is not None else "read from the image's layers",
        )

    def _push(
        self,
        registry: RegistryClient,
        path: str,
        artifacts: Sequence[Artifact],
        subject: Descriptor,
    ) -> Manifest:
        for artifact in artifacts:
            registry.upload_blob(path, artifact.data)
        manifest = referrers.artifact_manifest(artifacts, subject=subject)
        registry.put_manifest_by_digest(path, manifest)
        return manifest

    def _existing_layers(
        self, registry: RegistryClient, path: str, tag: str
    ) -> list[tuple[dict[str, Any], bytes]]:
        """(layer descriptor, blob) of the manifest a cosign tag holds now, if any."""
        try:
            current = registry.get_manifest(path, tag)
        except RegistryPermanentError as exc:
            if exc.status_code == 404:
                return []
            raise
        doc = _json(current.body, f"manifest {path}:{tag}")
        found = []
        for layer in doc.get("layers") or []:
            if isinstance(layer, dict):
                blob = registry.get_blob(path, _descriptor_digest(layer, "layer"))
                found.append((layer, blob))
        return found

    def _signature(
        self, registry: RegistryClient, target: ImageRef, subject: Descriptor
    ) -> Manifest:
        """cosign's signature manifest, keeping signatures others (or earlier runs) made."""
        assert self._signer is not None
        payload = simple_signing_payload(_docker_reference(target), subject.digest)
        tag = referrers.cosign_tag(subject.digest, "sig")
        layers_now = self._existing_layers(registry, target.path, tag)
        kept: list[Artifact] = []
        ours: Artifact | None = None
        for layer, blob in layers_now:
            annotations = {str(k): str(v) for k, v in (layer.get("annotations") or {}).items()}
            artifact = Artifact(
                artifact_type=SIGNATURE_ARTIFACT_TYPE,
                media_type=str(layer.get("mediaType") or SIMPLE_SIGNING_MEDIA_TYPE),
                data=blob,
                layer_annotations=annotations,
            )
            if blob == payload and self._signer.verifies(
                blob, annotations.get(SIGNATURE_ANNOTATION, "")
            ):
                ours = artifact  # a retry: this key already signed this image
            kept.append(artifact)
        if ours is None:
            kept.append(
                Artifact(
                    artifact_type=SIGNATURE_ARTIFACT_TYPE,
                    media_type=SIMPLE_SIGNING_MEDIA_TYPE,
                    data=payload,
                    layer_annotations={SIGNATURE_ANNOTATION: self._signer.sign_b64(payload)},
                )
            )
        kept = [dataclasses.replace(kept[0], annotations={KIND_ANNOTATION: "signature"}), *kept[1:]]
        return self._push(registry, target.path, kept, subject)

    def _attestation(
        self,
        registry: RegistryClient,
        target: ImageRef,
        subject: Descriptor,
        facts: BuildFacts,
    ) -> Manifest:
        assert self._signer is not None
        doc = statement(image_name=target.repository, image_digest=subject.digest, facts=facts)
        envelope = dsse_envelope(encode_statement(doc), self._signer)
        tag = referrers.cosign_tag(subject.digest, "att")
        kept: list[Artifact] = []
        for layer, blob in self._existing_layers(registry, target.path, tag):
            annotations = {str(k): str(v) for k, v in (layer.get("annotations") or {}).items()}
            if annotations.get("predicateType") == SLSA_PREDICATE_TYPE and self._is_ours(blob):
                continue  # our provenance from an earlier attempt; replaced below
            kept.append(
                Artifact(
                    artifact_type=ATTESTATION_ARTIFACT_TYPE,
                    media_type=str(layer.get("mediaType") or DSSE_MEDIA_TYPE),
                    data=blob,
                    layer_annotations=annotations,
                )
            )
        kept.append(
            Artifact(
                artifact_type=ATTESTATION_ARTIFACT_TYPE,
                media_type=DSSE_MEDIA_TYPE,
                data=envelope,
                # cosign writes an empty signature annotation on attestation layers.
                layer_annotations={"predicateType": SLSA_PREDICATE_TYPE, SIGNATURE_ANNOTATION: ""},
            )
        )
        kept = [
            dataclasses.replace(kept[0], annotations={KIND_ANNOTATION: "provenance"}),
            *kept[1:],
        ]
        return self._push(registry, target.path, kept, subject)

    def _is_ours(self, envelope: bytes) -> bool:
        assert self._signer is not None
        try:
            doc = json.loads(envelope)
            payload = base64.b64decode(doc["payload"])
            return any(
                self._signer.verifies(pae(doc["payloadType"], payload), s["sig"])
                for s in doc.get("signatures") or []
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            return False

    @staticmethod
    def _referrers_api(registry: RegistryClient, path: str, digest: str) -> bool:
        # Any answer (even an empty index) means the registry indexes subjects itself.
        return registry.referrers(path, digest) is not None

    @staticmethod
    def _update_fallback_index(
        registry: RegistryClient, path: str, digest: str, manifests: Sequence[Manifest]
    ) -> None:
        tag = referrers.fallback_tag(digest)
        try:
            existing: bytes | None = registry.get_manifest(path, tag).body
        except RegistryPermanentError as exc:
            if exc.status_code != 404:
                raise
            existing = None
        descriptors = [referrers.descriptor_of(m) for m in manifests]
        replaces = [
            (KIND_ANNOTATION, d.annotations[KIND_ANNOTATION])
            for d in descriptors
            if KIND_ANNOTATION in d.annotations
        ]
        try:
            index = referrers.merge_referrers_index(existing, descriptors, replaces=replaces)
        except referrers.ReferrersError:
            # Something else owns that tag with a document we cannot read; start it afresh.
            index = referrers.merge_referrers_index(None, descriptors)
        registry.put_manifest(path, tag, index)


def _docker_reference(target: ImageRef) -> str:
    """The repository as cosign names it in the payload (go-containerregistry's Context().Name()).

    Docker Hub repositories are written with the index.docker.io host there.
    """
    if target.host in {"docker.io", "registry-1.docker.io", "index.docker.io"}:
        return f"index.docker.io/{target.path}"
    return target.repository


def _platform_image(index: dict[str, Any]) -> str | None:
    """The digest of the index's linux/amd64 image, else of its first image."""
    images = [
        m
        for m in index.get("manifests") or []
        if isinstance(m, dict)
        and m.get("mediaType") in {OCI_MANIFEST, DOCKER_MANIFEST}
        and isinstance(m.get("digest"), str)
    ]
    for item in images:
        platform = item.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return str(item["digest"])
    return str(images[0]["digest"]) if images else None


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SupplyError(f"{what} is not JSON") from exc
    if not isinstance(doc, dict):
        raise SupplyError(f"{what} is not a JSON object")
    return doc


def _size(descriptor: dict[str, Any]) -> int | None:
    size = descriptor.get("size")
    return size if isinstance(size, int) and size >= 0 else None


def _descriptor_digest(value: object, what: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("digest"), str):
        raise SupplyError(f"image manifest has a {what} without a digest")
    return str(value["digest"])
