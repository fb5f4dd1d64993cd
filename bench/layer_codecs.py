"""How long the native builder takes to pack package layers with each codec, and their size.

Usage (repository root)::

    .venv/bin/python bench/layer_codecs.py [--rounds 3] [--requirements "mlflow==X scikit-learn"]

Installs an MLflow scikit-learn model's requirements (by default: this venv's mlflow,
scikit-learn, skops, numpy, scipy and pandas versions, as the tests log them) into a scratch
directory with uv, groups them into layers as the native builder does
(``layers.group_distributions``), and packs every layer with gzip level 6 (the level before the
codec setting), gzip level 1 (the default) and zstd level 3, first on one core and then on
every core (one thread per core, as the builder packs). Prints the median time of ``--rounds``
rounds and the total blob size per codec. Layers are written to /dev/null-like sinks that only
count bytes: the figure is CPU, not disk.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from mlflow_dock.imaging import layers  # noqa: E402
from mlflow_dock.imaging.wheels import distributions  # noqa: E402

DISTRIBUTIONS = ("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")
CODECS: dict[str, layers.LayerCodec] = {
    "gzip level 6 (before)": layers.Gzip(level=6),
    "gzip level 1 (default)": layers.Gzip(),
    "zstd level 3": layers.Zstd(),
}


class Counter:
    """A binary sink that only counts what is written."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def pack(group: layers.PackageGroup, target: Path, codec: layers.LayerCodec) -> int:
    out = Counter()
    layers.write_layer(group.entries(target, LAYOUT), out, codec=codec)  # type: ignore[arg-type]
    return out.size


LAYOUT = layers.VenvLayout("/opt/mlflow-dock/venv", "3.11")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--requirements",
        default=" ".join(f"{d}=={importlib.metadata.version(d)}" for d in DISTRIBUTIONS),
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as scratch:
        target = Path(scratch) / "site-packages"
        subprocess.run(
            ["uv", "pip", "install", "-q", "--target", str(target), *args.requirements.split()],
            check=True,
        )
        groups = layers.group_distributions(distributions(target), {})
        groups.sort(key=lambda g: -sum(f.stat().st_size for f in _files(g, target)))
        installed = sum(f.stat().st_size for g in groups for f in _files(g, target))
        cores = os.cpu_count() or 1
        print(
            f"{len(distributions(target))} distributions in {len(groups)} layers, "
            f"{installed / 1e6:.1f} MB installed; {cores} cores; median of {args.rounds} rounds"
        )
        print("| codec | one core | every core | blobs |")
        print("| --- | ---: | ---: | ---: |")
        for name, codec in CODECS.items():
            serial, parallel, size = [], [], 0
            for _ in range(args.rounds):
                started = time.perf_counter()
                size = sum(pack(group, target, codec) for group in groups)
                serial.append(time.perf_counter() - started)
                started = time.perf_counter()
                with ThreadPoolExecutor(cores) as pool:
                    list(pool.map(lambda g, c=codec: pack(g, target, c), groups))
                parallel.append(time.perf_counter() - started)
            print(
                f"| {name} | {statistics.median(serial):.1f} s "
                f"| {statistics.median(parallel):.1f} s | {size / 1e6:.1f} MB |"
            )
    return 0


def _files(group: layers.PackageGroup, target: Path) -> list[Path]:
    found = []
    for entry in group.entries(target, LAYOUT):
        source = getattr(entry, "source", None)
        if source is not None and Path(source).is_file():
            found.append(Path(source))
    return found


if __name__ == "__main__":
    raise SystemExit(main())
