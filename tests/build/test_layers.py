"""Deterministic layers: same files, same bytes; one layer per package; scripts re-pointed."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

from mlflow_dock.build import layers
from mlflow_dock.build.wheels import distributions
from support.disttree import fake_dist

LAYOUT = layers.VenvLayout("/opt/mlflow-dock/venv", "3.11")
SITE = "opt/mlflow-dock/venv/lib/python3.11/site-packages"


def _layer(target: Path, name: str) -> tuple[layers.LayerDigests, bytes]:
    dist = next(d for d in distributions(target) if d.name == name)
    out = io.BytesIO()
    digests = layers.write_layer(layers.distribution_entries(dist, target, LAYOUT), out)
    return digests, out.getvalue()


def _members(blob: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_same_package_same_digest_whatever_the_disk_says(tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    fake_dist(one, "pkg", "1.0", {"pkg/__init__.py": b"x = 1\n"})
    fake_dist(two, "pkg", "1.0", {"pkg/__init__.py": b"x = 1\n"}, requested=True)
    (two / "pkg" / "__init__.py").chmod(0o600)
    os.utime(two / "pkg" / "__init__.py", (12345, 12345))
    # Another package beside it in one target changes nothing in pkg's layer.
    fake_dist(two, "other", "2.0", {"other.py": b""})
    first, blob = _layer(one, "pkg")
    second, _ = _layer(two, "pkg")
    assert first == second
    members = _members(blob)
    init = members[f"{SITE}/pkg/__init__.py"]
    assert (init.uid, init.gid, init.mtime, init.mode, init.uname) == (0, 0, 0, 0o644, "")
    assert f"{SITE}/pkg_1.0.dist-info/REQUESTED" not in members
    assert list(members) == sorted(members)
    assert "opt" in members and members["opt"].isdir()


def test_gzip_header_carries_no_time_or_name(tmp_path: Path):
    fake_dist(tmp_path, "pkg", "1.0", {"pkg/a.py": b""})
    _, blob = _layer(tmp_path, "pkg")
    assert blob[4:8] == b"\0\0\0\0"  # MTIME
    assert blob[3] & 0x08 == 0  # no FNAME


def test_console_scripts_point_at_the_image_python_and_record_matches(tmp_path: Path):
    script = b"#!/root/.pyenv/versions/3.11.7/bin/python\nimport sys\n"
    fake_dist(tmp_path, "tool", "1.0", {"tool.py": b""}, scripts={"tool": script})
    _, blob = _layer(tmp_path, "tool")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        entry = tar.getmember("opt/mlflow-dock/venv/bin/tool")
        data = tar.extractfile(entry).read()
        record = tar.extractfile(f"{SITE}/tool-1.0.dist-info/RECORD").read().decode()
    assert data.startswith(b"#!/opt/mlflow-dock/venv/bin/python\n")
    assert entry.mode == 0o755
    assert "../../../bin/tool,sha256=" in record
    assert "\nbin/tool" not in record


def test_source_date_epoch_sets_the_time(tmp_path: Path, monkeypatch):
    fake_dist(tmp_path, "pkg", "1.0", {"pkg/a.py": b""})
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    _, blob = _layer(tmp_path, "pkg")
    assert {m.mtime for m in _members(blob).values()} == {1700000000}


def _dists(tmp_path: Path, count: int):
    for i in range(count):
        fake_dist(tmp_path, f"p{i:03d}", "1.0", {f"p{i:03d}.py": b"x" * i})
    return distributions(tmp_path)


def test_one_layer_per_package_under_the_budget(tmp_path: Path):
    dists = _dists(tmp_path, 5)
    groups = layers.group_distributions(dists, {}, LAYOUT)
    assert [len(g.distributions) for g in groups] == [1] * 5
    assert len({g.key for g in groups}) == 5


def test_over_the_budget_small_packages_share_stable_buckets(tmp_path: Path):
    dists = _dists(tmp_path, 30)
    sizes = {d.dist_info: i for i, d in enumerate(dists)}
    groups = layers.group_distributions(dists, sizes, LAYOUT, max_layers=12, buckets=4)
    assert len(groups) <= 12
    assert sorted(d.name for g in groups for d in g.distributions) == sorted(d.name for d in dists)
    own = {g.distributions[0].name for g in groups if len(g.distributions) == 1}
    assert {"p029", "p028"} <= own  # the largest keep their own layer
    again = layers.group_distributions(dists, sizes, LAYOUT, max_layers=12, buckets=4)
    assert [g.key for g in groups] == [g.key for g in again]


def test_budget_leaves_room_for_base_venv_and_model():
    assert layers.package_layer_budget(1) == layers.MAX_PACKAGE_LAYERS
    assert layers.package_layer_budget(40) + 40 + 2 <= layers.IMAGE_LAYER_BUDGET
