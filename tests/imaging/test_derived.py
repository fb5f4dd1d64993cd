"""Derived bases: a base plus the Debian packages its libraries need (imaging/derived.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlflow_dock.cloud.static import StaticCredentials
from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging.baseimage import BaseFacts, BaseImage
from mlflow_dock.imaging.derived import (
    DERIVED_FROM_LABEL,
    OS_PACKAGES_LABEL,
    EngineDerivedBases,
    ExistingDerivedBases,
)
from mlflow_dock.imaging.engine import EngineTransfers
from mlflow_dock.imaging.ospackages import derived_tag
from mlflow_dock.imaging.pipeline import NoRuntimeLocks
from mlflow_dock.imaging.wheels import Platform
from mlflow_dock.oci.manifest import OCI_CONFIG, OCI_MANIFEST, Manifest
from mlflow_dock.oci.reference import ImageRef
from support.fakes import DIGEST_1, REGISTRY, FakeEngine, RotatingCredentials
from support.registry import OciRegistry

PATH = "team/mlflow-dock-base"
DERIVED = ImageRef(f"{REGISTRY}/{PATH}")


def _base() -> BaseImage:
    return BaseImage(
        host=REGISTRY,
        repository="base/debian",
        platform=Platform.parse("linux/amd64"),
        manifest=Manifest.from_bytes(b"{}", "application/vnd.oci.image.manifest.v1+json"),
        config={},
        layers=(),
        facts=BaseFacts(glibc=(2, 36), pythons={}, libraries=frozenset()),
    )


@dataclass
class Memory:
    runtimes: dict[tuple[str, str], str] = field(default_factory=dict)

    def runtime_image(self, key: str, repository: str) -> str | None:
        return self.runtimes.get((key, repository))

    def remember_runtime_image(self, key: str, repository: str, digest: str) -> None:
        self.runtimes[(key, repository)] = digest


@dataclass
class Parts:
    bases: EngineDerivedBases
    engine: FakeEngine
    registry: OciRegistry
    memory: Memory
    log: list[str]


def make_parts(credentials=None) -> Parts:  # type: ignore[no-untyped-def]
    engine, memory = FakeEngine(), Memory()
    bases = EngineDerivedBases(
        DERIVED,
        memory=memory,
        engine=EngineTransfers(
            engine,  # type: ignore[arg-type]
            credentials or StaticCredentials(username="u", password="p"),
        ),
        locks=NoRuntimeLocks(),
        prepare_repository=lambda _ref: None,
        timeout_seconds=60,
    )
    return Parts(bases, engine, OciRegistry(REGISTRY), memory, [])


@pytest.fixture
def parts() -> Parts:
    return make_parts()


def derive_libgomp(parts: Parts, bases: ExistingDerivedBases | None = None, tmp_path=Path("/x")):  # type: ignore[no-untyped-def]
    return (bases or parts.bases).derive(
        parts.registry.client(), _base(), ("libgomp1",), work=tmp_path, log=parts.log.append
    )


def push_derived(registry: OciRegistry, *, derived_from: str, packages: str) -> str:
    """A derived base as an earlier build pushed it: labelled with what it was made from."""
    config = json.dumps(
        {"config": {"Labels": {DERIVED_FROM_LABEL: derived_from, OS_PACKAGES_LABEL: packages}}}
    ).encode()
    config_digest = registry.put_blob(PATH, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [],
    }
    tag = derived_tag(_base().manifest.digest, ["libgomp1"])
    return registry.put_manifest(PATH, json.dumps(manifest).encode(), OCI_MANIFEST, tag=tag)


THIS_BASE = f"{REGISTRY}/base/debian@{_base().manifest.digest}"


def test_a_derived_base_is_built_once_with_apt_pushed_and_its_digest_recorded(
    parts: Parts, tmp_path: Path
) -> None:
    base = _base()
    waiter = derive_libgomp(parts, tmp_path=tmp_path)
    assert waiter is not None
    tag = derived_tag(base.manifest.digest, ["libgomp1"])
    assert waiter() == f"{PATH}@{DIGEST_1}"
    assert parts.engine.pulls == [(f"{REGISTRY}/base/debian", base.manifest.digest)]
    (built, labels, dockerfile) = parts.engine.builds[0]
    assert built == f"{REGISTRY}/{PATH}:{tag}"
    assert dockerfile.startswith(f"FROM {THIS_BASE}")
    assert "libgomp1" in dockerfile and labels[OS_PACKAGES_LABEL] == "libgomp1"
    assert parts.engine.pushes == [(f"{REGISTRY}/{PATH}", tag)]
    assert list(parts.memory.runtimes.values()) == [DIGEST_1]


def test_a_recorded_derived_base_is_reused_by_its_digest_without_an_engine(parts: Parts) -> None:
    digest = push_derived(parts.registry, derived_from=THIS_BASE, packages="libgomp1")
    # The tag moved since (no model can write here, but the store is what is trusted).
    parts.registry.tags[(PATH, derived_tag(_base().manifest.digest, ["libgomp1"]))] = (
        parts.registry.put_manifest(PATH, b'{"schemaVersion":2,"layers":[]}', OCI_MANIFEST)
    )
    tag = derived_tag(_base().manifest.digest, ["libgomp1"])
    parts.memory.runtimes[(f"os-base:{tag}", DERIVED.repository)] = digest
    waiter = derive_libgomp(parts)
    assert waiter is not None and waiter() == f"{PATH}@{digest}"
    assert parts.engine.builds == [] and parts.engine.pulls == []


def test_a_fresh_store_takes_the_tagged_derived_base_that_says_what_it_was_made_from(
    parts: Parts,
) -> None:
    digest = push_derived(parts.registry, derived_from=THIS_BASE, packages="libgomp1")
    waiter = derive_libgomp(parts)
    assert waiter is not None and waiter() == f"{PATH}@{digest}"
    assert parts.engine.builds == [] and list(parts.memory.runtimes.values()) == [digest]


def test_a_tagged_image_made_from_something_else_is_not_used(parts: Parts) -> None:
    push_derived(
        parts.registry, derived_from=f"{REGISTRY}/evil/base@sha256:{'e' * 64}", packages="libgomp1"
    )
    waiter = derive_libgomp(parts)
    assert waiter is not None and waiter() == f"{PATH}@{DIGEST_1}"
    assert len(parts.engine.builds) == 1  # built anew instead


def test_without_an_engine_only_an_existing_derived_base_is_used(parts: Parts) -> None:
    existing = ExistingDerivedBases(DERIVED, memory=parts.memory)
    assert derive_libgomp(parts, existing) is None
    digest = push_derived(parts.registry, derived_from=THIS_BASE, packages="libgomp1")
    waiter = derive_libgomp(parts, existing)
    assert waiter is not None and waiter() == f"{PATH}@{digest}"


def test_a_base_pull_refused_for_a_cloud_token_gets_one_fresh_token() -> None:
    credentials = RotatingCredentials()
    parts = make_parts(credentials)
    pull = parts.engine.pull
    refusals = [PermanentError("pulling base: unauthorized: authentication required")]

    def pull_refused_once(repository: str, reference: str, *, username, password) -> None:
        if refusals:
            raise refusals.pop()
        assert password == "token-1"
        pull(repository, reference, username=username, password=password)

    parts.engine.pull = pull_refused_once  # type: ignore[method-assign]
    waiter = derive_libgomp(parts)
    assert waiter is not None
    waiter()
    assert credentials.invalidated == 1
    assert parts.engine.pulls == [(f"{REGISTRY}/base/debian", _base().manifest.digest)]
