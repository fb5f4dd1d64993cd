"""Deterministic layers: same files, same bytes; one layer per package; scripts re-pointed."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

from mlflow_dock.imaging import layers
from mlflow_dock.imaging.wheels import distributions
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
    groups = layers.group_distributions(dists, {})
    assert [len(g.distributions) for g in groups] == [1] * 5
    assert [g.label for g in groups] == [f"p{i:03d}==1.0" for i in range(5)]


def test_over_the_budget_small_packages_share_stable_buckets(tmp_path: Path):
    dists = _dists(tmp_path, 30)
    sizes = {d.dist_info: i for i, d in enumerate(dists)}
    groups = layers.group_distributions(dists, sizes, max_layers=12, buckets=4)
    assert len(groups) <= 12
    assert sorted(d.name for g in groups for d in g.distributions) == sorted(d.name for d in dists)
    own = {g.distributions[0].name for g in groups if len(g.distributions) == 1}
    assert {"p029", "p028"} <= own  # the largest keep their own layer
    again = layers.group_distributions(dists, sizes, max_layers=12, buckets=4)
    assert groups == again


def test_budget_leaves_room_for_base_venv_and_model():
    assert layers.package_layer_budget(1) == layers.MAX_PACKAGE_LAYERS
    assert layers.package_layer_budget(40) + 40 + 3 <= layers.IMAGE_LAYER_BUDGET


# --------------------------------------------------------------------------- content keys


def _key(target: Path, name: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
    dist = next(d for d in distributions(target) if d.name == name)
    options = {"codec": layers.Gzip(), "digests": layers.FileDigests(), **kwargs}
    return layers.content_key(layers.distribution_entries(dist, target, LAYOUT), **options)


def _tamper(target: Path, relative: str, data: bytes) -> None:
    """Change a file after install, as a wheel whose files do not match its RECORD would."""
    path = target / relative
    path.unlink()  # a new inode, as an installer writing another file would leave
    path.write_bytes(data)


def test_installs_with_the_same_record_but_other_files_get_other_keys(tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    for target in (one, two):
        fake_dist(target, "pkg", "1.0", {"pkg/__init__.py": b"x = 1\n"})
    _tamper(two, "pkg/__init__.py", b"x = 2\n")
    assert (one / "pkg-1.0.dist-info/RECORD").read_bytes() == (
        two / "pkg-1.0.dist-info/RECORD"
    ).read_bytes()
    assert _key(one, "pkg") != _key(two, "pkg")
    # The same content and layout again is the same key: the layer is reused.
    three = tmp_path / "three"
    fake_dist(three, "pkg", "1.0", {"pkg/__init__.py": b"x = 1\n"}, requested=True)
    os.utime(three / "pkg" / "__init__.py", (12345, 12345))
    assert _key(one, "pkg") == _key(three, "pkg")


def test_a_record_mismatch_is_packed_as_installed_under_its_own_key(tmp_path: Path):
    """Decided: not refused. The key is the content's, so the mismatch poisons no other layer."""
    honest, tampered = tmp_path / "honest", tmp_path / "tampered"
    fake_dist(honest, "pkg", "1.0", {"pkg/a.py": b"good\n"})
    fake_dist(tampered, "pkg", "1.0", {"pkg/a.py": b"good\n"})
    _tamper(tampered, "pkg/a.py", b"evil\n")
    assert _key(honest, "pkg") != _key(tampered, "pkg")
    _, blob = _layer(tampered, "pkg")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        assert tar.extractfile(f"{SITE}/pkg/a.py").read() == b"evil\n"  # type: ignore[union-attr]


def test_key_covers_mode_link_target_time_and_codec_not_the_level(tmp_path: Path, monkeypatch):
    fake_dist(tmp_path, "pkg", "1.0", {"pkg/run.py": b"#!/bin/sh\n", "pkg/data": b"d"})
    (tmp_path / "pkg" / "link").symlink_to("data")
    record = tmp_path / "pkg-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + "pkg/link,,\n")
    base = _key(tmp_path, "pkg")
    assert _key(tmp_path, "pkg", codec=layers.Gzip(level=9)) == base
    assert _key(tmp_path, "pkg", codec=layers.Zstd()) != base
    assert _key(tmp_path, "pkg", mtime=1) != base
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert _key(tmp_path, "pkg") != base
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    (tmp_path / "pkg" / "run.py").chmod(0o755)
    executable = _key(tmp_path, "pkg")
    assert executable != base
    (tmp_path / "pkg" / "link").unlink()
    (tmp_path / "pkg" / "link").symlink_to("run.py")
    assert _key(tmp_path, "pkg") not in (base, executable)


def test_file_digests_read_a_file_once_until_it_changes(tmp_path: Path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"one")
    calls = []
    real = layers.hashlib.file_digest

    def counting(file, name):  # type: ignore[no-untyped-def]
        calls.append(name)
        return real(file, name)

    monkeypatch.setattr(layers.hashlib, "file_digest", counting)
    digests = layers.FileDigests()
    first = digests.sha256(path)
    assert digests.sha256(path) == first and len(calls) == 1
    # A hard link is the same inode: uv links installed files from its cache.
    os.link(path, tmp_path / "g")
    assert digests.sha256(tmp_path / "g") == first and len(calls) == 1
    # Written again (same size): a new mtime, so it is read again. (Set here: the clock
    # the kernel stamps files with ticks in milliseconds.)
    before = path.stat().st_mtime_ns
    path.write_bytes(b"two")
    os.utime(path, ns=(before, before + 4_000_001))
    assert digests.sha256(path) != first and len(calls) == 2
    # A time in whole seconds (as copied from an archive) never stands for the content.
    os.utime(path, (1_700_000_000, 1_700_000_000))
    digests.sha256(path)
    digests.sha256(path)
    assert len(calls) == 4


def test_file_digests_forget_the_oldest_half_when_full(tmp_path: Path):
    digests = layers.FileDigests(capacity=4)
    for i in range(6):
        (tmp_path / str(i)).write_bytes(str(i).encode())
        digests.sha256(tmp_path / str(i))
    assert len(digests._known) <= 4


# --------------------------------------------------------------------------- codecs, packing


def test_zstd_layers_are_deterministic_and_hold_the_same_tar(tmp_path: Path):
    import zstandard

    fake_dist(tmp_path, "pkg", "1.0", {"pkg/a.py": b"x" * 100_000, "pkg/b.py": b"y"})
    dist = distributions(tmp_path)[0]
    entries = list(layers.distribution_entries(dist, tmp_path, LAYOUT))
    blobs, results = [], []
    for codec in (layers.Zstd(), layers.Zstd(), layers.Gzip()):
        out = io.BytesIO()
        results.append(layers.write_layer(entries, out, codec=codec))
        blobs.append(out.getvalue())
    assert results[0] == results[1] and blobs[0] == blobs[1]
    assert results[0].diff_id == results[2].diff_id  # same tar, other compression
    assert results[0].digest != results[2].digest
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blobs[0])).read()
    assert tar == gzip.decompress(blobs[2])
    assert layers.codec_named("zstd").media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert layers.codec_named("gzip").media_type == "application/vnd.oci.image.layer.v1.tar+gzip"


def test_layers_packed_in_parallel_are_the_bytes_packed_one_by_one(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    for i in range(8):
        # Incompressible enough to span many copy buffers and deflate blocks.
        data = os.urandom(300_000) + bytes(range(256)) * 2000
        fake_dist(tmp_path, f"p{i}", "1.0", {f"p{i}/big.bin": data, f"p{i}/small.py": b""})
    groups = layers.group_distributions(distributions(tmp_path), {})

    def pack(group: layers.PackageGroup, codec: layers.LayerCodec) -> layers.LayerDigests:
        return layers.write_layer(group.entries(tmp_path, LAYOUT), io.BytesIO(), codec=codec)

    for codec in (layers.Gzip(), layers.Zstd()):
        serial = [pack(group, codec) for group in groups]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda g, c=codec: pack(g, c), groups))
        assert serial == parallel
