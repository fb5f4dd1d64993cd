"""Big models through the service, side by side with stock MLflow and with the floor.

Usage (repository root, as root, Docker Engine running)::

    .venv/bin/python bench/big_model.py [--sizes 1,10] [--stock-max-gib 1]
                                        [--first-weights-gib N] [--wait-quiet SECONDS]

For each size, a pyfunc model whose artifacts hold that many GiB of incompressible (random)
weights, which it only stats when it loads (tests/support/big_model_code), gets three versions:

1. version 1 (a new runtime: built natively, full smoke test);
2. version 2 with new weights (assembled on version 1 in the registry, warm smoke test);
3. version 3 that keeps version 2's weights and changes a small file (its MLmodel).

mlflow-dock is the real service (``mlflow-dock serve`` as a subprocess) on its default path: the
native builder, smoke tests on, a webhook from MLflow. Each version is logged first (untimed),
then registered; the time is from the registration to the version tag visible in the registry.
The service's memory is sampled over its whole process tree (the service and its children, uv
included) every 0.1 s: the peak of the summed RSS per version, and each process's VmHWM.

In the same run, for each version: the floor, downloading the version's artifacts from MLflow
(``mlflow.artifacts.download_artifacts``, as the service does) and hashing them once (sha256),
which no builder can beat, measured right after the service's build (with ``--in-place``, the
service reads versions where MLflow stores them, MLFLOW_DOCK_ARTIFACTS_DESTINATION, and the
floor is one hash of the files there); and stock: ``mlflow
models generate-dockerfile`` + ``docker build`` + ``docker push`` exactly as
``bench/build_speed.py`` runs it, for every version after the service's three (which come
minutes apart, as a team's versions do; stock's builds in between would outlast the warm
runtime's 15 idle minutes), up to ``--stock-max-gib`` (stock on 10 GiB takes very long and needs
the disk twice). Blob uploads are counted from the registry's own log.

Disk: the weights exist only while a version is logged (regenerated from a seed when a later
version keeps them), and a version's artifacts are removed from MLflow once it is measured.
``--first-weights-gib`` makes version 1 smaller (e.g. on a 10 GiB run with little disk): it only
provides the runtime and the warm container later versions are checked in.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (REPO_ROOT / "src", REPO_ROOT, REPO_ROOT / "bench", REPO_ROOT / "tests"):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import build_speed as bs  # noqa: E402
import docker  # noqa: E402
import docker.errors  # noqa: E402
import psutil  # noqa: E402
from native_build import uploads  # noqa: E402

from mlflow_dock.oci.reference import repository_name  # noqa: E402
from mlflow_dock.oci.remote import RegistryClient  # noqa: E402
from support import web  # noqa: E402
from support.big_models import Logged, log_weights_model, register  # noqa: E402
from support.servers import ServiceProcess, start_service  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "big-model.md"
GIB = 1 << 30
MIB = 1 << 20
_CHUNK = 16 * MIB


# --------------------------------------------------------------------------- weights


def write_weights(path: Path, size: int, seed: int) -> Path:
    """``size`` incompressible bytes, the same for the same seed (a version keeping its weights
    gets the very same file again, without keeping it on disk in between)."""
    state = hashlib.sha256(f"weights-{seed}".encode()).digest()
    with path.open("wb") as out:
        left = size
        while left > 0:
            # SHAKE-256 as a stream cipher of the seed: deterministic, fast, incompressible.
            block = hashlib.shake_256(state + left.to_bytes(8, "big")).digest(min(_CHUNK, left))
            out.write(block)
            left -= len(block)
    return path


# --------------------------------------------------------------------------- memory


class TreeMemory:
    """Samples the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._root = psutil.Process(pid)
        self._interval = interval
        self._samples: list[tuple[float, int]] = []
        self._hwm: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                processes = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                processes = []
            for process in processes:
                try:
                    total += process.memory_info().rss
                    hwm = _vm_hwm(process.pid)
                    if hwm is not None:
                        name = " ".join(process.cmdline()[:3])[:60]
                        if hwm > self._hwm.get(process.pid, ("", 0))[1]:
                            self._hwm[process.pid] = (name, hwm)
                except psutil.Error:
                    continue
            self._samples.append((time.monotonic(), total))
            self._stop.wait(self._interval)

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self._samples if start <= t <= end), default=0)

    def high_water_marks(self) -> list[tuple[str, int]]:
        return sorted(self._hwm.values(), key=lambda item: -item[1])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- one version


@dataclass
class Row:
    size_gib: float
    label: str
    version: str = ""
    seconds: float | None = None
    floor: float | None = None
    stock: float | None = None
    peak_rss: int = 0
    uploads: int = 0
    growth: int = 0
    lines: list[str] = field(default_factory=list)
    error: str | None = None


def floor_seconds(tracking_uri: str, logged: Logged, workdir: Path) -> float:
    """Download the version's artifacts as the service does, and hash every file once."""
    from mlflow.artifacts import download_artifacts

    target = Path(tempfile.mkdtemp(prefix="floor-", dir=workdir))
    try:
        started = time.monotonic()
        local = Path(
            download_artifacts(
                artifact_uri=logged.source, dst_path=str(target), tracking_uri=tracking_uri
            )
        )
        hash_files(local)
        return time.monotonic() - started
    finally:
        shutil.rmtree(target, ignore_errors=True)


def hash_files(root: Path) -> None:
    """sha256 of every file under ``root``, once."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(MIB):
                digest.update(chunk)


def in_place_floor_seconds(mlflow_server: bs.MlflowServer, logged: Logged) -> float:
    """Hash every file of the version once where the tracking server stores it (--in-place)."""
    (found,) = [
        path / "artifacts"
        for path in mlflow_server.artifacts_dir.rglob(logged.model_id)
        if path.is_dir()
    ]
    started = time.monotonic()
    hash_files(found)
    return time.monotonic() - started


def wait_for_tag(
    service: ServiceProcess,
    registry: bs.RegistryServer,
    path: str,
    model: str,
    version: str,
    timeout: float,
) -> float:
    """Seconds until ``path:version`` exists in the registry (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    last_jobs = 0.0
    with RegistryClient(
        registry.host, username=registry.username, password=registry.password
    ) as client:
        while time.monotonic() < deadline:
            if client.manifest_digest(path, version) is not None:
                return time.monotonic()
            if time.monotonic() - last_jobs > 2:
                last_jobs = time.monotonic()
                for job in web.get(f"{service.url}/builds", timeout=10).json():
                    if (job["model_name"], job["version"], job["state"]) == (
                        model,
                        version,
                        "failed",
                    ):
                        raise RuntimeError(f"{model} v{version} failed: {job['error']}")
            time.sleep(0.05)
    raise RuntimeError(f"{model} v{version}: no tag within {timeout:.0f} s")


def job_lines(service: ServiceProcess, model: str, version: str) -> list[str]:
    jobs = web.get(f"{service.url}/builds", timeout=10).json()
    job = next(j for j in jobs if j["model_name"] == model and j["version"] == version)
    detail = web.get(
        f"{service.url}/builds/{job['id']}", params={"log_lines": 200}, timeout=10
    ).json()
    wanted = (
        "downloaded",
        "model file",
        "assembled",
        "attached SBOM",
        "smoke test",
        "packages installed",
        "published",
    )
    stamps = [f"job created {job['created_at']}, started {job['started_at']}"]
    return stamps + [line for line in detail["log_tail"] if any(w in line for w in wanted)]


def drop_artifacts(mlflow_server: bs.MlflowServer, logged: Logged) -> None:
    """Remove a measured version's artifacts from MLflow's disk (the 10 GiB runs need it)."""
    for found in mlflow_server.artifacts_dir.rglob(logged.model_id):
        if found.is_dir():
            shutil.rmtree(found, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1", help="GiB of weights, comma-separated")
    parser.add_argument("--stock-max-gib", type=float, default=1.0)
    parser.add_argument("--first-weights-gib", type=float, default=None)
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="the service reads versions where MLflow stores them "
        "(MLFLOW_DOCK_ARTIFACTS_DESTINATION); the floor is then one hash of them there",
    )
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s]
    bs.LOG_DIR.mkdir(parents=True, exist_ok=True)
    client = docker.from_env(timeout=3600)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-dock-big-model-bench-"))
    run_id = uuid.uuid4().hex[:8]
    registry = mlflow_server = service = memory = None
    rows: list[Row] = []
    hwm: list[tuple[str, int]] = []
    print(shutil.disk_usage(workdir), flush=True)
    try:
        machine = bs.machine_info(client)
        bs.remove_bench_images(client)
        base_image = bs.ensure_base_image()
        bench_base = bs.build_bench_base(client, base_image, run_id)
        registry = bs.start_registry(workdir / "registry", "bench", uuid.uuid4().hex)
        mlflow_server = bs.start_mlflow_server(workdir / "mlflow")
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
        stand_in = "python:{}.{}.{}-slim".format(*sys.version_info[:3])
        bs.build_stand_in(client, bench_base, stand_in)
        bs.seed_registry(client, registry, {"debian": bench_base, "python": stand_in})
        secret = uuid.uuid4().hex
        service = start_service(
            {
                "MLFLOW_WEBHOOK_SECRET": secret,
                "DOCKER_USERNAME": registry.username,
                "DOCKER_REGISTRY_PASSWORD": registry.password,
                "DOCKER_REGISTRY": registry.host,
                "MLFLOW_TRACKING_URI": mlflow_server.url,
                "MLFLOW_DOCK_DATA_DIR": str(workdir / "service-data"),
                "MLFLOW_DOCK_BASE_IMAGE": f"{registry.host}/bench-base/debian:seed",
                "MLFLOW_DOCK_BUILD_CA_BUNDLE": str(bs.SYSTEM_CA_BUNDLE),
                "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
                **(
                    {"MLFLOW_DOCK_ARTIFACTS_DESTINATION": str(mlflow_server.artifacts_dir)}
                    if args.in_place
                    else {}
                ),
            },
            workdir / "service",
        )
        memory = TreeMemory(service.pid or 0)
        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        mlflow.create_webhook(
            name="bench",
            url=f"{service.url}/webhook",
            events=["model_version.created"],
            secret=secret,
        )
        time.sleep(1.5)  # the server's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL=1)

        for size in sizes:
            model = f"bench-big-{size:g}g-{run_id}"
            path = repository_name(model)
            first = args.first_weights_gib if args.first_weights_gib is not None else size
            plan = [
                ("version 1 (new runtime)", first, 1, "one"),
                ("version 2, new weights", size, 2, "two"),
                ("version 3, keeps its weights", size, 2, "three"),
            ]
            stock_side = size <= args.stock_max_gib
            logged_versions: list[tuple[Row, Logged]] = []
            for label, gib, seed, marker in plan:
                row = Row(size, label)
                rows.append(row)
                print(f"{size:g} GiB {label}: logging...", flush=True)
                weights = write_weights(workdir / "weights.bin", int(gib * GIB), seed)
                logged = log_weights_model(
                    mlflow_server.url, model, weights, marker=marker, register=False
                )
                weights.unlink()
                if args.wait_quiet > 0:
                    bs.wait_until_quiet(client, args.wait_quiet, 0.25)
                before, uploads_before = registry.stored_bytes(), uploads(registry)
                started = time.monotonic()
                row.lines.append(f"registered at {datetime.now(UTC).isoformat()}")
                row.version = register(mlflow_server.url, model, logged)
                try:
                    done = wait_for_tag(
                        service, registry, path, model, row.version, timeout=3600 * size
                    )
                except RuntimeError as exc:
                    row.error = str(exc)
                    print(row.error, flush=True)
                    break
                row.seconds = done - started
                row.peak_rss = memory.peak(started, done)
                row.growth = registry.stored_bytes() - before
                row.uploads = uploads(registry) - uploads_before
                row.lines += job_lines(service, model, row.version)
                print(f"  {row.seconds:.1f} s, peak RSS {row.peak_rss / MIB:.0f} MiB", flush=True)
                row.floor = (
                    in_place_floor_seconds(mlflow_server, logged)
                    if args.in_place
                    else floor_seconds(mlflow_server.url, logged, workdir)
                )
                print(f"  floor {row.floor:.1f} s", flush=True)
                if stock_side:
                    logged_versions.append((row, logged))
                else:
                    drop_artifacts(mlflow_server, logged)
            # Stock after the service's versions, which come minutes apart as a team's do
            # (interleaved, stock's builds outlast the warm runtime's 15 idle minutes).
            for row, logged in logged_versions:
                print(f"{size:g} GiB {row.label}: stock...", flush=True)
                bs.MODEL_NAME = model
                stock = bs.run_stock(
                    client,
                    registry,
                    mlflow_server,
                    version=row.version,
                    workdir=workdir,
                    expected_from=stand_in,
                )
                row.stock = stock.end_to_end
                print(f"  stock {row.stock:.1f} s", flush=True)
                # Another run's cleanup on a shared daemon may have removed it already.
                with contextlib.suppress(docker.errors.ImageNotFound):
                    client.images.remove(stock.image, force=True)
                drop_artifacts(mlflow_server, logged)
        hwm = memory.high_water_marks()
    finally:
        if memory is not None:
            memory.stop()
        if service is not None:
            service.stop()
        if registry is not None:
            registry.stop()
        if mlflow_server is not None:
            mlflow_server.stop()
        bs.remove_bench_images(client)
        for image in client.images.list():
            if registry is not None and any(t.startswith(registry.host) for t in image.tags):
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(image.id, force=True)
        shutil.rmtree(workdir, ignore_errors=True)

    report = render(rows, hwm, machine, args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    return 0


def render(rows: list[Row], hwm: list[tuple[str, int]], machine: dict[str, str], args) -> str:  # type: ignore[no-untyped-def]
    lines = [
        f"Machine: {json.dumps(machine)}; {bs.code_state()}",
        "",
        "| weights | version | mlflow-dock (registration to tag) | "
        + ("floor (hash in place) " if args.in_place else "floor (download + hash) ")
        + "| x floor | stock | vs stock | peak RSS (service tree) | blob uploads "
        + "| registry growth |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row.seconds is None:
            lines.append(f"| {row.size_gib:g} GiB | {row.label} | failed: {row.error} |")
            continue
        x_floor = f"{row.seconds / row.floor:.1f}x" if row.floor else ""
        stock = f"{row.stock:.1f} s" if row.stock else "(not run)"
        versus = f"{100 * row.seconds / row.stock:.0f} %" if row.stock else ""
        lines.append(
            f"| {row.size_gib:g} GiB | {row.label} | {row.seconds:.1f} s | {row.floor:.1f} s | "
            f"{x_floor} | {stock} | {versus} | {row.peak_rss / MIB:.0f} MiB | {row.uploads} | "
            f"{bs.fmt_b(row.growth)} |"
        )
    lines += ["", "Peak RSS (VmHWM) per process of the service's tree:", ""]
    lines += [f"- {hw / MIB:.0f} MiB: {name}" for name, hw in hwm[:8]]
    lines += ["", "Job log lines:", ""]
    for row in rows:
        lines.append(f"- {row.size_gib:g} GiB {row.label}:")
        lines += [f"    - {line}" for line in row.lines]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
