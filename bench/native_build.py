"""Engine-free builds (MLFLOW_DOCK_BUILDER=native) side by side with stock MLflow, one run.

Usage (repository root, as root, Docker Engine running)::

    .venv/bin/python bench/native_build.py [--wait-quiet SECONDS]

One local CNCF Distribution registry, one MLflow server, one machine. Registered models:

* ``bench-a`` (versions 1 and 2): the small scikit-learn model of ``bench/build_speed.py``;
  its version 1 is the *very first build* (empty registry, empty worker);
* ``bench-b``: the same requirements plus ``tabulate`` (a new model whose requirements overlap
  an earlier model's, every package has a wheel), on the *warm* worker that built bench-a;
* ``bench-s``: the same requirements plus ``statsmodels`` (all wheels, two new packages) on a
  *fresh* worker: its data directory (job store, layer table, uv cache, base facts) is wiped
  first, as a new pod or a new installation on a registry that holds other models;
* ``bench-c``: the same requirements plus ``lightgbm`` (needs libgomp.so.1, which the Debian
  minbase base lacks: the engine adds libgomp1 to a derived base, the rest stays native), on a
  fresh worker too.

Stock: ``mlflow models generate-dockerfile`` + ``docker build`` + ``docker push`` exactly as in
``bench/build_speed.py`` (same stand-in ``python:X.Y-slim`` on the same Debian layer; its
shared layers, full ``mlflow`` included, are built by ``bench-a`` first, as in a registry that
holds other models). mlflow-dock: the service's job path (``execute_job`` with the composition
root's runner) with ``builder="native"``, the bench Debian base pushed to the registry, smoke
test off. Blob uploads are counted from the registry's own log (one line per completed upload
PUT). Each mlflow-dock row also lists when (seconds from the job's start) uv had installed the
requirements, the image was assembled, and the SBOM attached.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (REPO_ROOT / "src", REPO_ROOT / "bench", REPO_ROOT / "tests"):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import build_speed as bs  # noqa: E402
import docker  # noqa: E402

from mlflow_dock.app import Components  # noqa: E402
from mlflow_dock.jobs.model import JobState  # noqa: E402
from mlflow_dock.jobs.worker import execute_job  # noqa: E402
from mlflow_dock.settings import Settings  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "native.md"
UPLOAD_RE = re.compile(r'msg="response completed".*http\.request\.method=PUT .*/blobs/uploads/')


def uploads(registry: bs.RegistryServer) -> int:
    return sum(1 for line in registry.log_path.read_text().splitlines() if UPLOAD_RE.search(line))


def pinned(*extra: str) -> list[str]:
    import importlib.metadata

    names = ("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")
    return [f"{d}=={importlib.metadata.version(d)}" for d in names] + list(extra)


def native_settings(
    registry: bs.RegistryServer,
    mlflow_server: bs.MlflowServer,
    data_dir: Path,
    base: str,
    *,
    smoke: bool,
) -> Settings:
    return Settings(
        _env_file=None,
        webhook_secret="x",
        docker_username=registry.username,
        docker_registry_password=registry.password,
        docker_registry=registry.host,
        mlflow_tracking_uri=mlflow_server.url,
        data_dir=data_dir,
        base_image=base,
        builder="native",
        build_ca_bundle=bs.SYSTEM_CA_BUNDLE,
        build_network="host",
        smoke_test=smoke,
    )


def run_native(
    registry: bs.RegistryServer, settings: Settings, model: str, version: str
) -> dict[str, object]:
    components = Components(settings)
    store, runner = components.store, components.runner
    logs = bs.TimedLogs(settings.data_dir / "logs")
    before, uploads_before = registry.stored_bytes(), uploads(registry)
    start = time.monotonic()
    job, _ = store.request_build(model, version)
    claimed = store.claim_next(owner="bench", lease_seconds=3600)
    assert claimed is not None and claimed.id == job.id
    finished = execute_job(
        claimed,
        store=store,
        runner=runner,
        logs=logs,
        max_attempts=1,
        backoff_seconds=0,
        lease_seconds=3600,
    )
    seconds = time.monotonic() - start
    store.close()
    lines = [line for _t, line in logs.lines]
    phases = {
        name: round(next(t for t, line in logs.lines if marker in line) - start, 1)
        for name, marker in (
            ("uv", "packages installed"),
            ("assembled", "without an engine"),
            ("sbom", "attached SBOM"),
        )
        if any(marker in line for _t, line in logs.lines)
    }
    if finished is None or finished.state is not JobState.SUCCEEDED:
        error = finished.error if finished is not None else "not recorded"
        raise RuntimeError(f"{model} v{version}: {error}\n" + "\n".join(lines[-30:]))
    if any("in the registry on top of" in line for line in lines):
        path = "registry assembly (previous version's layers)"
    elif any("derived base" in line for line in lines):
        path = "native on a derived base (engine: apt only)"
    elif any("without an engine" in line for line in lines):
        path = "native (no engine)"
    else:
        path = "engine fallback"
    return {
        "side": "mlflow-dock native",
        "model": model,
        "version": version,
        "path": path,
        "seconds": seconds,
        "growth": registry.stored_bytes() - before,
        "uploads": uploads(registry) - uploads_before,
        "phases": phases,
        "log": [
            line
            for line in lines
            if "packages installed" in line
            or "assembled" in line
            or "derived base" in line
            or "attached SBOM" in line
        ],
    }


def run_stock(
    client: docker.DockerClient,
    registry: bs.RegistryServer,
    mlflow_server: bs.MlflowServer,
    model: str,
    version: str,
    workdir: Path,
    stand_in: str,
) -> dict[str, object]:
    bs.MODEL_NAME = model
    uploads_before = uploads(registry)
    result = bs.run_stock(
        client, registry, mlflow_server, version=version, workdir=workdir, expected_from=stand_in
    )
    return {
        "side": "stock",
        "model": model,
        "version": version,
        "path": "generate-dockerfile + docker build + push",
        "seconds": result.end_to_end,
        "growth": result.registry_growth,
        "uploads": uploads(registry) - uploads_before,
        "phases": {},
        "log": [],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args()
    bs.LOG_DIR.mkdir(parents=True, exist_ok=True)
    client = docker.from_env(timeout=3600)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-dock-native-bench-"))
    run_id = uuid.uuid4().hex[:12]
    registry = mlflow_server = None
    rows: list[dict[str, object]] = []
    try:
        machine = bs.machine_info(client)
        bs.remove_bench_images(client)
        base_image = bs.ensure_base_image()
        bench_base = bs.build_bench_base(client, base_image, run_id)
        registry = bs.start_registry(workdir / "registry", "bench", uuid.uuid4().hex)
        mlflow_server = bs.start_mlflow_server(workdir / "mlflow")
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
        print("setup: registering models...", flush=True)
        for _ in range(2):
            bs.log_sklearn_model(mlflow_server.url, "bench-a")
        bs.log_sklearn_model(mlflow_server.url, "bench-b", pip_requirements=pinned("tabulate"))
        bs.log_sklearn_model(
            mlflow_server.url, "bench-s", pip_requirements=pinned("statsmodels==0.15.0")
        )
        bs.log_sklearn_model(mlflow_server.url, "bench-c", pip_requirements=pinned("lightgbm"))
        stand_in = "python:{}.{}.{}-slim".format(*sys.version_info[:3])
        bs.build_stand_in(client, bench_base, stand_in)
        bs.seed_registry(client, registry, {"debian": bench_base, "python": stand_in})
        native_base = f"{registry.host}/bench-base/debian:seed"
        data_dir = workdir / "native-data"

        def quiet() -> None:
            if args.wait_quiet > 0:
                bs.wait_until_quiet(client, args.wait_quiet, 0.25)

        # (side, model, version, worker): "fresh" wipes the worker's data directory first.
        plan = [
            ("stock", "bench-a", "1", ""),
            ("native", "bench-a", "1", "fresh"),
            ("stock", "bench-b", "1", ""),
            ("native", "bench-b", "1", "warm"),
            ("native", "bench-a", "2", "warm"),
            ("stock", "bench-s", "1", ""),
            ("native", "bench-s", "1", "fresh"),
            ("stock", "bench-c", "1", ""),
            ("native", "bench-c", "1", "fresh"),
        ]
        for side, model, version, worker in plan:
            quiet()
            print(f"run: {side} {model} v{version} {worker}...", flush=True)
            if side == "stock":
                row = run_stock(client, registry, mlflow_server, model, version, workdir, stand_in)
            else:
                if worker == "fresh":
                    shutil.rmtree(data_dir, ignore_errors=True)
                settings = native_settings(
                    registry, mlflow_server, data_dir, native_base, smoke=False
                )
                row = run_native(registry, settings, model, version)
            row["worker"] = worker
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        if registry is not None:
            registry.stop()
        if mlflow_server is not None:
            mlflow_server.stop()
        bs.remove_bench_images(client)

    def find(side: str, model: str, version: str = "1") -> dict[str, object]:
        return next(
            r
            for r in rows
            if r["side"].startswith(side) and r["model"] == model and r["version"] == version
        )

    lines = [
        f"Machine: {json.dumps(machine)}",
        "",
        "| side | model | version | worker | path | end to end | vs stock | registry growth "
        "| blob uploads | uv / assembled / SBOM at |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        ratio = ""
        if row["side"] != "stock" and row["version"] == "1":
            stock = find("stock", str(row["model"]))
            ratio = f"{100 * float(row['seconds']) / float(stock['seconds']):.0f} %"
        phases = row["phases"]
        at = " / ".join(
            f"{phases[name]:.1f} s" if name in phases else "-"
            for name in ("uv", "assembled", "sbom")
        )
        lines.append(
            f"| {row['side']} | {row['model']} | {row['version']} | {row['worker']} | "
            f"{row['path']} | {float(row['seconds']):.1f} s | {ratio} | "
            f"{bs.fmt_b(int(row['growth']))} | {row['uploads']} | {at if phases else ''} |"
        )
    report = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
