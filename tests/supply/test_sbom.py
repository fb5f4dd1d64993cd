"""Tests for mlflow_dock.supply.sbom: distributions as pip sees them, the CycloneDX document."""

from __future__ import annotations

import json

import pytest

from mlflow_dock.supply.layers import FileRecord
from mlflow_dock.supply.sbom import (
    BaseImage,
    ImageInfo,
    ModelInfo,
    NotOurSbom,
    canonical_name,
    cyclonedx,
    installed_distributions,
    read_cyclonedx,
)

SITE = "opt/venv/lib/python3.11/site-packages"
SYSTEM = "usr/lib/python3/dist-packages"
DIGEST = "sha256:" + "ab" * 32


def meta(name: str, version: str, *extra: str) -> FileRecord:
    return FileRecord("file", "\n".join([f"Name: {name}", f"Version: {version}", *extra]))


def test_distributions_with_licences_hashes_and_first_one_wins():
    files = {
        f"{SITE}/Foo_Bar-1.0.dist-info/METADATA": meta(
            "Foo_Bar", "1.0", "License-Expression: MIT OR Apache-2.0"
        ),
        f"{SITE}/Foo_Bar-1.0.dist-info/RECORD": FileRecord("file", None, "cc" * 32),
        f"{SITE}/Foo_Bar-1.0.dist-info/INSTALLER": FileRecord("file", "uv\n"),
        f"{SITE}/Foo_Bar-1.0.dist-info/direct_url.json": FileRecord(
            "file",
            json.dumps(
                {"url": "https://x/foo.whl", "archive_info": {"hashes": {"sha256": "DD" * 32}}}
            ),
        ),
        f"{SITE}/classic-2.dist-info/METADATA": meta(
            "classic",
            "2",
            "License: some long text\n that continues",
            "Classifier: License :: OSI Approved :: BSD License",
        ),
        f"{SITE}/plain-3.dist-info/METADATA": meta("plain", "3", "License: ZPL 2.1"),
        f"{SITE}/none-4.dist-info/METADATA": meta("none", "4", "License: UNKNOWN"),
        f"{SITE}/old.egg-info": FileRecord("file", "Name: old\nVersion: 0.1"),
        f"{SITE}/broken-1.dist-info/METADATA": FileRecord("file", "Summary: no name"),
        f"{SITE}/stray-1.dist-info/RECORD": FileRecord("file", None, "ee" * 32),
        f"{SYSTEM}/foo-bar-0.9.dist-info/METADATA": meta("foo-bar", "0.9"),
        f"{SYSTEM}/debian-1.dist-info/METADATA": meta("debian", "1"),
    }
    dists = {d.key: d for d in installed_distributions(files, [SITE, SYSTEM])}
    assert {k: d.version for k, d in dists.items()} == {
        "foo-bar": "1.0",  # the venv's, not the system's 0.9
        "classic": "2",
        "plain": "3",
        "none": "4",
        "old": "0.1",
        "debian": "1",
    }
    foo = dists["foo-bar"]
    assert foo.licenses == ({"expression": "MIT OR Apache-2.0"},)
    assert foo.hashes == (("SHA-256", "dd" * 32),)
    assert foo.record_sha256 == "cc" * 32 and foo.installer == "uv"
    assert foo.purl == "pkg:pypi/foo-bar@1.0"
    assert dists["classic"].licenses == ({"license": {"name": "BSD License"}},)
    assert dists["plain"].licenses == ({"license": {"name": "ZPL 2.1"}},)
    assert dists["none"].licenses == ()


def test_distributions_outside_the_site_dirs_are_not_listed():
    files = {"usr/local/lib/python3.11/site-packages/x-1.dist-info/METADATA": meta("x", "1")}
    assert installed_distributions(files, [SITE]) == []


def test_canonical_name_is_pep_503():
    assert canonical_name("Foo__Bar.baz-Qux") == "foo-bar-baz-qux"


def test_cyclonedx_document():
    files = {f"{SITE}/a-1+local.dist-info/METADATA": meta("A", "1+local")}
    dists = installed_distributions(files, [SITE])
    image = ImageInfo(
        repository="reg:5000/ns/iris", digest=DIGEST, created="2026-01-01T00:00:00Z", tags=("v3",)
    )
    document = cyclonedx(
        image=image,
        distributions=dists,
        base=BaseImage("python:3.11-slim", "python@sha256:" + "12" * 32),
        model=ModelInfo("Iris", "3", "run1", "models:/m-1", "sha256:" + "34" * 32),
        tool_version="0.1.0",
    )
    doc = json.loads(document)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    assert doc["serialNumber"].startswith("urn:uuid:")
    assert doc["metadata"]["timestamp"] == "2026-01-01T00:00:00Z"
    assert doc["metadata"]["component"]["hashes"] == [{"alg": "SHA-256", "content": "ab" * 32}]
    assert doc["metadata"]["component"]["purl"] == (
        "pkg:oci/iris@sha256%3A" + "ab" * 32 + "?repository_url=reg:5000/ns/iris&tag=v3"
    )
    by_ref = {c["bom-ref"]: c for c in doc["components"]}
    assert by_ref["base-image"]["hashes"] == [{"alg": "SHA-256", "content": "12" * 32}]
    assert by_ref["base-image"]["version"] == "3.11-slim"
    model = by_ref["model"]
    assert model["type"] == "machine-learning-model" and model["version"] == "3"
    assert {"name": "mlflow-dock:model:run-id", "value": "run1"} in model["properties"]
    library = by_ref["pkg:pypi/a@1%2Blocal"]
    assert library["name"] == "A" and library["version"] == "1+local"
    assert doc["dependencies"][0]["dependsOn"] == ["base-image", "model", "pkg:pypi/a@1%2Blocal"]
    # Same image, same bytes: a retried job attaches an identical SBOM.
    assert document == cyclonedx(
        image=image,
        distributions=dists,
        base=BaseImage("python:3.11-slim", "python@sha256:" + "12" * 32),
        model=ModelInfo("Iris", "3", "run1", "models:/m-1", "sha256:" + "34" * 32),
        tool_version="0.1.0",
    )


def test_locally_built_base_keeps_its_image_id_as_a_property():
    doc = json.loads(
        cyclonedx(
            image=ImageInfo(repository="r/x", digest=DIGEST),
            distributions=[],
            base=BaseImage("local-base:1", "sha256:" + "56" * 32),
            model=None,
            tool_version="0",
        )
    )
    base = doc["components"][0]
    assert "purl" not in base and "hashes" not in base
    assert base["properties"] == [
        {"name": "mlflow-dock:base-image:image-id", "value": "sha256:" + "56" * 32}
    ]
    assert "timestamp" not in doc["metadata"]


def test_an_sbom_read_back_gives_the_distributions_and_base_it_was_written_from():
    files = {
        f"{SITE}/Foo_Bar-1.0.dist-info/METADATA": meta(
            "Foo_Bar", "1.0", "Classifier: License :: OSI Approved :: MIT License"
        ),
        f"{SITE}/Foo_Bar-1.0.dist-info/RECORD": FileRecord("file", None, "cc" * 32),
        f"{SITE}/Foo_Bar-1.0.dist-info/INSTALLER": FileRecord("file", "uv\n"),
        f"{SITE}/Foo_Bar-1.0.dist-info/direct_url.json": FileRecord(
            "file", json.dumps({"archive_info": {"hashes": {"sha256": "dd" * 32}}})
        ),
        f"{SITE}/plain-3.dist-info/METADATA": meta("plain", "3", "License-Expression: MIT"),
    }
    dists = installed_distributions(files, [SITE])
    for base in (
        BaseImage("reg:5000/base/python:3.11", "reg:5000/base/python@sha256:" + "12" * 32),
        BaseImage("local-base:1", "sha256:" + "56" * 32),
        BaseImage("python:3.11-slim"),
    ):
        document = cyclonedx(
            image=ImageInfo(repository="reg:5000/ns/iris", digest=DIGEST),
            distributions=dists,
            base=base,
            model=ModelInfo("Iris", "3"),
            tool_version="0.1.0",
        )
        assert read_cyclonedx(document, image_digest=DIGEST) == (dists, base)


def test_only_our_sbom_of_the_image_asked_for_is_read_back():
    ours = cyclonedx(
        image=ImageInfo(repository="r/x", digest=DIGEST),
        distributions=[],
        base=None,
        model=None,
        tool_version="0",
    )
    with pytest.raises(NotOurSbom, match="describes"):
        read_cyclonedx(ours, image_digest="sha256:" + "cd" * 32)
    theirs = json.loads(ours)
    theirs["metadata"]["tools"]["components"][0]["name"] = "syft"
    for document in (json.dumps(theirs).encode(), b"{not json", b"[]"):
        with pytest.raises(NotOurSbom):
            read_cyclonedx(document, image_digest=DIGEST)
