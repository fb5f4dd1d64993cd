"""Tests for mlflow_dock.supply.layers: scanning layer tarballs, whiteouts, which python runs."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from mlflow_dock.supply.layers import (
    FileRecord,
    LayerScan,
    LayerScanError,
    merge_layers,
    python_site_dirs,
    scan_layer,
)

SITE = "opt/mlflow-dock/venv/lib/python3.11/site-packages"
METADATA = "Metadata-Version: 2.1\nName: Foo_Bar\nVersion: 1.2\nLicense: MIT\n\nLong text\n"


def layer(entries: dict[str, bytes | str | None], *, compress: bool = True) -> io.BytesIO:
    """A layer tarball: bytes -> file, str -> symlink target, None -> directory."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    data = raw.getvalue()
    return io.BytesIO(gzip.compress(data) if compress else data)


def test_scan_keeps_metadata_headers_record_hash_and_python_binaries():
    scan = scan_layer(
        layer(
            {
                "opt/mlflow-dock/venv/bin/python": "python3",
                "opt/mlflow-dock/venv/bin/python3": "/usr/local/bin/python3",
                "opt/mlflow-dock/venv/pyvenv.cfg": b"home = /usr/local/bin\n",
                f"{SITE}/foo_bar-1.2.dist-info": None,
                f"{SITE}/foo_bar-1.2.dist-info/METADATA": METADATA.encode(),
                f"{SITE}/foo_bar-1.2.dist-info/RECORD": b"foo/__init__.py,sha256=x,1\n",
                f"{SITE}/foo_bar-1.2.dist-info/top_level.txt": b"foo\n",
                f"{SITE}/foo/__init__.py": b"",
                "opt/ml/model/MLmodel": b"flavors: {}\n",
            }
        )
    )
    meta = scan.files[f"{SITE}/foo_bar-1.2.dist-info/METADATA"]
    assert meta.text is not None and "Long text" not in meta.text and "Name: Foo_Bar" in meta.text
    record = scan.files[f"{SITE}/foo_bar-1.2.dist-info/RECORD"]
    assert record.text is None and record.sha256 is not None and len(record.sha256) == 64
    assert scan.files["opt/mlflow-dock/venv/bin/python"] == FileRecord("link", text="python3")
    assert "opt/ml/model/MLmodel" in scan.files
    assert f"{SITE}/foo/__init__.py" not in scan.files
    assert f"{SITE}/foo_bar-1.2.dist-info/top_level.txt" not in scan.files


def test_scan_reads_uncompressed_layers_and_dot_slash_names():
    scan = scan_layer(
        layer({f"./{SITE}/x-1.dist-info/METADATA": b"Name: x\nVersion: 1\n"}, compress=False)
    )
    assert f"{SITE}/x-1.dist-info/METADATA" in scan.files


def test_scan_records_whiteouts_and_opaque_directories():
    scan = scan_layer(layer({f"{SITE}/.wh.old-1.dist-info": b"", "opt/other/.wh..wh..opq": b""}))
    assert scan.whiteouts == (f"{SITE}/old-1.dist-info",)
    assert scan.opaque_dirs == ("opt/other",)


def test_scan_refuses_what_is_not_a_tarball():
    with pytest.raises(LayerScanError):
        scan_layer(io.BytesIO(b"definitely not a tar archive" * 40))


def test_scan_round_trips_through_its_cache_form():
    scan = scan_layer(layer({f"{SITE}/x-1.dist-info/METADATA": b"Name: x\nVersion: 1\n"}))
    assert LayerScan.from_json(scan.to_json()) == scan


@pytest.mark.parametrize("data", [b"not json", b'{"format": 999}', b'{"format": 1}'])
def test_unusable_cache_entries_read_as_none(data):
    assert LayerScan.from_json(data) is None


def test_merge_applies_whiteouts_and_opaque_dirs_in_layer_order():
    lower = LayerScan(
        files={
            f"{SITE}/a-1.dist-info/METADATA": FileRecord("file", "Name: a"),
            f"{SITE}/b-1.dist-info/METADATA": FileRecord("file", "Name: b"),
            "opt/other/x/MLmodel": FileRecord("file"),
        }
    )
    upper = LayerScan(
        files={f"{SITE}/a-2.dist-info/METADATA": FileRecord("file", "Name: a")},
        whiteouts=(f"{SITE}/a-1.dist-info",),
        opaque_dirs=("opt/other",),
    )
    merged = merge_layers([lower, upper])
    assert sorted(merged) == [
        f"{SITE}/a-2.dist-info/METADATA",
        f"{SITE}/b-1.dist-info/METADATA",
    ]


def files(*paths: str, cfg: str | None = None) -> dict[str, FileRecord]:
    found = {path: FileRecord("file") for path in paths}
    if cfg is not None:
        found["opt/venv/pyvenv.cfg"] = FileRecord("file", cfg)
    return found


def test_site_dirs_of_the_first_python_on_path():
    image = files(
        "opt/venv/bin/python3",
        "opt/venv/lib/python3.11/site-packages/a-1.dist-info/METADATA",
        "usr/local/bin/python3",
        "usr/local/lib/python3.11/site-packages/pip-24.dist-info/METADATA",
        cfg="home = /usr/local/bin\ninclude-system-site-packages = false\n",
    )
    path = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/bin"
    assert python_site_dirs(image, path) == ["opt/venv/lib/python3.11/site-packages"]
    assert python_site_dirs(image, "/usr/local/bin:/usr/bin") == [
        "usr/local/lib/python3.11/site-packages"
    ]


def test_venv_with_system_site_packages_sees_its_base_too():
    image = files(
        "opt/venv/bin/python",
        "opt/venv/lib/python3.11/site-packages/a-1.dist-info/METADATA",
        "usr/lib/python3/dist-packages/deb-1.dist-info/METADATA",
        "usr/lib/python3.11/site-packages/z-1.dist-info/METADATA",
        cfg="home = /usr/bin\ninclude-system-site-packages = true\n",
    )
    assert python_site_dirs(image, "/opt/venv/bin:/usr/bin") == [
        "opt/venv/lib/python3.11/site-packages",
        "usr/lib/python3.11/site-packages",
        "usr/lib/python3/dist-packages",
    ]


def test_no_python_on_path_means_no_site_dirs():
    assert python_site_dirs(files("usr/bin/sh"), "/usr/bin") == []
