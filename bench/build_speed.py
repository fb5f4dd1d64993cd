"""Build-speed benchmark: stock MLflow serving images vs mlflow-dock, on one machine.

Usage (from the repository root, as root, with the Docker Engine running)::

    .venv/bin/python bench/build_speed.py [--wait-quiet SECONDS] [--keep-images] [--keep-workdir]

In one run, against one local CNCF Distribution registry and one MLflow server, it registers
three versions of the same small scikit-learn model (identical requirements), then:

* stock: for versions 1 and 2, ``mlflow models generate-dockerfile -m models:/NAME/V
  --env-manager local`` (called in-process through the same backend the CLI uses, so neither
  side pays an interpreter start), then ``docker build`` with exactly the argv of MLflow's own
  ``build_image_from_context`` plus ``--network host``, then a push through the Docker SDK;
* mlflow-dock: versions 1 and 2 with the smoke test off, then version 3 with the smoke test
  on, each the way the service runs a build: ``store.request_build`` + ``store.claim_next`` in
  the service's own JobStore, then ``mlflow_dock.jobs.worker.execute_job`` with
  ``Components(settings).runner`` (the composition root), which records the outcome (image, digest)
  in that store. That record is what lets a later version take the registry-native fast path
  (``JobRunner.build`` looks the previous version's digest up with ``store.latest_image``):
  a version that can be assembled in the registry gets no engine build and no push, and is
  measured as users get it.

It prints a markdown table (also written to ``bench/results/latest.md``; build logs go to
``bench/results/logs/``) with the path each version took (engine build, or assembly in the
registry), download, build, push, assemble and end-to-end times, image sizes, registry growth
and stock/mlflow-dock ratios, plus the targets the numbers are meant to be read against.

How the comparison is kept fair:

* Same base for both sides. No image can be pulled here, so stock's ``FROM python:X.Y.Z-slim``
  is satisfied by a local stand-in tagged exactly that, built FROM the same offline Debian
  bookworm + python3.11 image mlflow-dock builds on. The stand-in adds what the official image
  has and Debian's lacks: ``python``/``pip`` on PATH (a venv at /usr/local, like the official
  image's /usr/local install).
* pip needs the host CA bundle to reach PyPI from a build. Stock's generated Dockerfile is left
  byte-for-byte as MLflow writes it; the stand-in carries the bundle and ``ENV PIP_CERT``
  instead (+~0.2 MB in stock's image). mlflow-dock gets it via ``build_ca_bundle``, which keeps
  it out of the final image.
* Cold version 1 for both: every run first removes the images earlier runs left (all carry the
  ``io.mlflow-dock.bench.run`` label) and then builds a fresh bench base (the Debian image plus
  that label: same single layer, new image id). The classic builder only reuses cache from
  images descending from the same parent id, so neither side can hit cache from earlier runs or
  from other users' images on a shared daemon, and nobody else's images are touched.
* Base layers are pushed to the registry (untimed) before anything is measured, as they would
  already be on Docker Hub for python:*-slim; otherwise whichever side pushed first would pay
  for the shared Debian layer and the other would get it for free.
* Both sides use the classic builder (Docker 20.10 default; DOCKER_BUILDKIT=0 for the CLI),
  ``--network host`` builds, and SDK pushes with per-call credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a plain script: tests/ makes the test support importable as the tests import it
# (`support.*`, one copy of each module), src/ finds mlflow_dock even without the editable
# install.
for _entry in (REPO_ROOT / "src", REPO_ROOT / "tests"):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

# Set before mlflow is imported anywhere: the network only reaches package indexes, and a
# telemetry call that hangs would land inside a measured interval.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import docker  # noqa: E402

from mlflow_dock.app import Components  # noqa: E402
from mlflow_dock.imaging.engine import DockerEngine  # noqa: E402
from mlflow_dock.imaging.warm import WARM_LABEL  # noqa: E402
from mlflow_dock.jobs.logs import BuildLogs  # noqa: E402
from mlflow_dock.jobs.model import JobState  # noqa: E402
from mlflow_dock.jobs.worker import execute_job  # noqa: E402
from mlflow_dock.oci.reference import repository_name  # noqa: E402
from mlflow_dock.settings import Settings  # noqa: E402
from support import web  # noqa: E402
from support.servers import (  # noqa: E402
    SYSTEM_CA_BUNDLE,
    MlflowServer,
    RegistryServer,
    ensure_base_image,
    log_sklearn_model,
    start_mlflow_server,
    start_registry,
)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
LOG_DIR = RESULTS_DIR / "logs"
BENCH_LABEL = "io.mlflow-dock.bench.run"
BENCH_BASE_REPO = "mlflow-dock-bench-base"
MODEL_NAME = "bench-iris"
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
MB = 1_000_000


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    side: str  # "stock" | "mlflow-dock"
    version: str
    label: str = ""
    # mlflow-dock only: "engine (runtime built)", "engine (runtime reused)" or "registry".
    path: str = ""
    download: float | None = None
    build: float | None = None
    push: float | None = None
    assemble: float | None = None  # registry-native fast path: layer + config + manifest + tag
    smoke: float | None = None
    end_to_end: float | None = None
    image: str = ""
    digest: str = ""
    image_size: int | None = None  # docker image inspect .Size (uncompressed, base included)
    compressed_size: int | None = None  # config + layer blobs in the pushed manifest
    registry_growth: int | None = None  # RegistryServer.stored_bytes() delta
    cpu_busy_before: float | None = None  # share of CPU busy just before the run started
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def other(self) -> float | None:
        """Time not in a named phase: job bookkeeping, metadata calls, runtime-key hashing."""
        if self.end_to_end is None:
            return None
        phases = (self.download, self.build, self.push, self.assemble, self.smoke)
        named = sum(x for x in phases if x)
        return max(self.end_to_end - named, 0.0)


# --------------------------------------------------------------------------- machine


def _cpu_times() -> tuple[int, int]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


def cpu_busy(sample_seconds: float = 2.0) -> float:
    """Instantaneous CPU use (0..1); load average lags by minutes after our own builds."""
    total0, idle0 = _cpu_times()
    time.sleep(sample_seconds)
    total1, idle1 = _cpu_times()
    total = max(total1 - total0, 1)
    return 1.0 - (idle1 - idle0) / total


# A container running longer than this is a leftover (e.g. a smoke test container of a killed
# test run), not a build or a smoke test in progress: it would keep the machine "busy" forever
# while costing no CPU. Real activity still shows up in the CPU sample.
STALE_CONTAINER_SECONDS = 600.0


def active_containers(client: docker.DockerClient) -> list[str]:
    """Names of running containers started recently enough to be builds or smoke tests."""
    active = []
    now = datetime.now(UTC)
    for container in client.containers.list():
        if WARM_LABEL in (container.labels or {}):
            continue  # a service's warm smoke-test runtime: idle between checks
        started = str(container.attrs.get("State", {}).get("StartedAt", ""))
        try:
            # Docker gives nanoseconds ("2026-11-26T16:01:02.123456789Z"); keep microseconds.
            head, _, frac = started.rstrip("Z").partition(".")
            since = datetime.fromisoformat(f"{head}.{(frac or '0')[:6]}+00:00")
        except ValueError:
            active.append(container.name)
            continue
        if (now - since).total_seconds() < STALE_CONTAINER_SECONDS:
            active.append(container.name)
    return active


def wait_until_quiet(client: docker.DockerClient, max_wait: float, threshold: float) -> float:
    """Wait (up to max_wait) for other work on this shared machine to stop; return CPU busy.

    Other users' builds on the same 2 cores would be measured as ours; waiting for a quiet
    machine is cheaper than re-running. Recently started containers are builds or smoke tests;
    long-running ones are leftovers and only count through the CPU they use.
    """
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        busy = cpu_busy()
        running = active_containers(client)
        if (busy < threshold and not running) or time.monotonic() > deadline:
            if announced or busy >= threshold or running:
                print(f"  machine: CPU {busy:.0%} busy, {len(running)} active container(s)")
            return busy
        if not announced:
            print(
                f"  waiting for a quiet machine (CPU {busy:.0%} busy, {len(running)} active "
                f"container(s); up to {max_wait:.0f}s)...",
                flush=True,
            )
            announced = True
        time.sleep(5)


def code_state() -> str:
    """Which mlflow-dock was measured: the tree may hold uncommitted work (a fast path)."""

    def git(*argv: str) -> str:
        proc = subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        # Not strip(): porcelain lines start with a status column that may be a space.
        return proc.stdout.rstrip("\n")

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines() if line]
    return f"HEAD {head}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def machine_info(client: docker.DockerClient) -> dict[str, str]:
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    mem_kb = int(meminfo["MemTotal"].split()[0])
    version = client.version()
    info = client.info()
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "docker": f"{version.get('Version')} (API {version.get('ApiVersion')}), "
        f"storage {info.get('Driver')}, classic builder",
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- docker helpers


def remove_bench_images(client: docker.DockerClient) -> int:
    """Remove every image an earlier run of this benchmark left behind; returns how many.

    Only images carrying BENCH_LABEL (inherited from the bench base) are touched: the daemon may
    be shared with test runs whose images must survive.
    """
    removed = 0
    for image in client.images.list(filters={"label": BENCH_LABEL}):
        # By tag, not id: removing an id that has several tags or children fails, while
        # untagging the last tag also deletes the untagged parents (rmi's default prune).
        for tag in image.tags:
            with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
                client.images.remove(tag, force=True)
                removed += 1
    # Builds leave untagged intermediates (classic-builder cache) and superseded images.
    pruned = client.images.prune(filters={"dangling": True, "label": BENCH_LABEL})
    removed += len(pruned.get("ImagesDeleted") or [])
    return removed


def build_quietly(
    client: docker.DockerClient,
    *,
    tag: str,
    dockerfile: str,
    files: dict[str, bytes] | None = None,
    network_mode: str | None = None,
) -> str:
    """Build an untimed helper image from an in-memory context; returns the image id."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in {"Dockerfile": dockerfile.encode(), **(files or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    image_id = None
    for chunk in client.api.build(
        fileobj=buffer,
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
        network_mode=network_mode,
    ):
        if "error" in chunk:
            raise RuntimeError(f"building {tag}: {chunk['error']}")
        if isinstance(chunk.get("aux"), dict):
            image_id = chunk["aux"].get("ID", image_id)
    return str(image_id or client.images.get(tag).id)


def sdk_push(client: docker.DockerClient, repository: str, tag: str, auth: dict[str, str]) -> str:
    """Push through the SDK with per-call credentials (`docker login` would write them to disk).

    The same mechanism mlflow-dock's engine uses, so push times differ only by what is pushed.
    """
    digest = None
    for chunk in client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth):
        if "error" in chunk:
            raise RuntimeError(f"pushing {repository}:{tag}: {chunk['error']}")
        aux = chunk.get("aux")
        if isinstance(aux, dict) and aux.get("Digest"):
            digest = str(aux["Digest"])
    if digest is None:
        raise RuntimeError(f"pushing {repository}:{tag}: no digest reported")
    return digest


def sdk_pull(client: docker.DockerClient, repository: str, tag: str, auth: dict[str, str]) -> None:
    for chunk in client.api.pull(repository, tag=tag, stream=True, decode=True, auth_config=auth):
        if "error" in chunk:
            raise RuntimeError(f"pulling {repository}:{tag}: {chunk['error']}")


def image_size(client: docker.DockerClient, reference: str) -> int | None:
    try:
        return int(client.images.get(reference).attrs["Size"])
    except docker.errors.ImageNotFound:
        # A registry-native path may publish a version without ever building it locally.
        return None


def manifest_size(registry: RegistryServer, repository_path: str, digest: str) -> int | None:
    """Compressed image size as the registry holds it: config blob + layer blobs."""
    url = f"{registry.url}/v2/{repository_path}/manifests/{digest}"
    response = web.get(url, auth=registry.auth, headers={"Accept": MANIFEST_ACCEPT}, timeout=30)
    response.raise_for_status()
    manifest = response.json()
    if "manifests" in manifest:  # an index: measure its first (only) platform
        return manifest_size(registry, repository_path, manifest["manifests"][0]["digest"])
    blobs = [manifest.get("config") or {}, *(manifest.get("layers") or [])]
    return sum(int(blob.get("size", 0)) for blob in blobs)


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- setup


def build_bench_base(client: docker.DockerClient, base_image: str, run_id: str) -> str:
    """The offline base plus a per-run label: same layer, fresh image id, so a cold cache."""
    tag = f"{BENCH_BASE_REPO}:{run_id}"
    build_quietly(client, tag=tag, dockerfile=f"FROM {base_image}\nLABEL {BENCH_LABEL}={run_id}\n")
    return tag


STAND_IN_DOCKERFILE = """\
FROM {bench_base}
# The official python:*-slim image has python and pip in /usr/local/bin; Debian's python3
# package has neither. A venv rooted at /usr/local gives both, on the same interpreter that
# mlflow-dock's image uses, so the two sides differ only in what their Dockerfiles do.
RUN python3 -m venv /usr/local && python --version && pip --version
# pip inside builds reaches PyPI only through the host's CA bundle. Baked in here so that
# stock's generated Dockerfile can be built exactly as MLflow writes it.
COPY host-ca.crt /usr/local/share/mlflow-dock-bench/host-ca.crt
ENV PIP_CERT=/usr/local/share/mlflow-dock-bench/host-ca.crt
CMD ["python3"]
"""


def build_stand_in(client: docker.DockerClient, bench_base: str, tag: str) -> str:
    build_quietly(
        client,
        tag=tag,
        dockerfile=STAND_IN_DOCKERFILE.format(bench_base=bench_base),
        files={"host-ca.crt": SYSTEM_CA_BUNDLE.read_bytes()},
        network_mode="host",
    )
    return tag


def seed_registry(
    client: docker.DockerClient, registry: RegistryServer, images: dict[str, str]
) -> None:
    """Push base images untimed, as python:*-slim's layers already are on Docker Hub.

    Pushes of either side then mount these layers instead of uploading them, so neither side's
    version 1 is charged (or credited) for the Debian layer the two share.
    """
    for name, source in images.items():
        repository = f"{registry.host}/bench-base/{name}"
        client.api.tag(source, repository, tag="seed", force=True)
        sdk_push(client, repository, "seed", registry.auth_config)


def model_python_version(model_dir: Path) -> str:
    import yaml

    env = yaml.safe_load((model_dir / "python_env.yaml").read_text())
    return str(env["python"])


# --------------------------------------------------------------------------- stock


def run_stock(
    client: docker.DockerClient,
    registry: RegistryServer,
    mlflow_server: MlflowServer,
    *,
    version: str,
    workdir: Path,
    expected_from: str,
) -> RunResult:
    from mlflow.models.flavor_backend_registry import get_flavor_backend

    import mlflow

    result = RunResult(side="stock", version=version, path="docker build + push")
    model_uri = f"models:/{MODEL_NAME}/{version}"
    context = workdir / f"stock-v{version}"
    shutil.rmtree(context, ignore_errors=True)
    repository = f"{registry.host}/stock/{repository_name(MODEL_NAME)}"
    image = f"{repository}:{version}"
    log_path = LOG_DIR / f"stock-v{version}.log"
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)

    before = registry.stored_bytes()
    start = time.monotonic()
    # What `mlflow models generate-dockerfile -m URI --env-manager local -d DIR` runs: resolve
    # the flavor backend (downloads MLmodel), then download the model into DIR and render.
    backend = get_flavor_backend(model_uri, docker_build=True, env_manager="local")
    backend.generate_dockerfile(model_uri, str(context))
    t_generated = time.monotonic()
    dockerfile = (context / "Dockerfile").read_text()
    first_from = next(line for line in dockerfile.splitlines() if line.startswith("FROM "))
    if first_from.split()[1] != expected_from:
        raise RuntimeError(f"stock Dockerfile says {first_from!r}, stand-in is {expected_from}")
    # MLflow's build_image_from_context argv (docker >= 19 adds --platform), plus --network
    # host, the only way builds reach the package mirrors here. Classic builder, as mlflow-dock.
    argv = [
        "docker",
        "build",
        "-t",
        image,
        "-f",
        "Dockerfile",
        "--platform",
        "linux/amd64",
        "--network",
        "host",
        ".",
    ]
    with log_path.open("w") as log:
        log.write(dockerfile + "\n----- docker build -----\n")
        log.flush()
        proc = subprocess.run(
            argv,
            cwd=context,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            check=False,
        )
    t_built = time.monotonic()
    if proc.returncode != 0:
        raise RuntimeError(f"stock docker build failed (exit {proc.returncode}); see {log_path}")
    digest = sdk_push(client, repository, version, registry.auth_config)
    t_pushed = time.monotonic()

    result.download = t_generated - start
    result.build = t_built - t_generated
    result.push = t_pushed - t_built
    result.end_to_end = t_pushed - start
    result.image = image
    result.digest = digest
    result.registry_growth = registry.stored_bytes() - before
    result.image_size = image_size(client, image)
    result.compressed_size = manifest_size(registry, repository.partition("/")[2], digest)
    shutil.rmtree(context, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- mlflow-dock


class TimedEngine(DockerEngine):
    """Records how long the runner spends in engine builds, pushes and pulls.

    A subclass rather than log parsing, so the phase split stays right whatever the runner
    logs. The registry-native path records no build and no push; it pulls only for a smoke
    test.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spans: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def _span(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.spans.append((name, start, time.monotonic()))

    def build(self, *args: Any, **kwargs: Any) -> str:
        with self._span("build"):
            return super().build(*args, **kwargs)

    def push(self, *args: Any, **kwargs: Any) -> Any:
        with self._span("push"):
            return super().push(*args, **kwargs)

    def pull(self, *args: Any, **kwargs: Any) -> None:
        with self._span("pull"):
            super().pull(*args, **kwargs)

    def total(self, name: str) -> float | None:
        spans = [end - start for kind, start, end in self.spans if kind == name]
        return sum(spans) if spans else None

    def last_end(self, name: str) -> float | None:
        ends = [end for kind, _start, end in self.spans if kind == name]
        return max(ends) if ends else None


class TimedLogs(BuildLogs):
    """The service's per-job log files, plus each line's monotonic time for the phase split."""

    def __init__(self, directory: Path, *, secrets: Iterable[str] = ()) -> None:
        super().__init__(directory, secrets=secrets)
        self.lines: list[tuple[float, str]] = []

    def append(self, job_id: str, line: str) -> None:
        self.lines.append((time.monotonic(), line))
        super().append(job_id, line)


# Log lines of JobRunner.build that tell which path a version took.
ASSEMBLED = re.compile(r"^assembled \S+ in the registry")
RUNTIME_BUILT = "building runtime image"
RUNTIME_REUSED = "reusing runtime image"
ASSEMBLY_REFUSED = "registry assembly not possible"


def dock_settings(
    registry: RegistryServer,
    mlflow_server: MlflowServer,
    *,
    data_dir: Path,
    base_image: str,
    smoke_test: bool,
) -> Settings:
    return Settings(
        _env_file=None,
        webhook_secret="x",
        docker_username=registry.username,
        docker_registry_password=registry.password,
        docker_registry=registry.host,
        mlflow_tracking_uri=mlflow_server.url,
        data_dir=data_dir,
        base_image=base_image,
        build_ca_bundle=SYSTEM_CA_BUNDLE,
        build_network="host",
        smoke_test=smoke_test,
    )


def run_dock(
    client: docker.DockerClient,
    registry: RegistryServer,
    settings: Settings,
    *,
    version: str,
    label: str = "",
) -> RunResult:
    """One version through the service's job path: request, claim, execute_job, recorded.

    The store is the service's own (settings.data_dir/jobs.db), shared by all versions of this
    run, so version N+1 finds version N's digest there as the running service would.
    """
    result = RunResult(side="mlflow-dock", version=version, label=label)
    components = Components(settings)
    components.engine = TimedEngine(network_mode="host")
    store = components.store
    engine = components.engine
    runner = components.runner
    logs = TimedLogs(settings.data_dir / "logs", secrets=settings.secret_values())
    log_path = LOG_DIR / f"mlflow-dock-v{version}.log"

    def first(predicate: Callable[[str], bool]) -> float | None:
        return next((t for t, line in logs.lines if predicate(line)), None)

    before = registry.stored_bytes()
    start = time.monotonic()
    try:
        job, created = store.request_build(MODEL_NAME, version)
        if not created:
            raise RuntimeError(f"version {version} already had a build job ({job.state})")
        claimed = store.claim_next()
        if claimed is None or claimed.id != job.id:
            raise RuntimeError(f"claimed {claimed} instead of the build job {job.id}")
        finished = execute_job(
            claimed,
            store=store,
            runner=runner,
            logs=logs,
            # One attempt: a retry after a backoff would be measured as build time.
            max_attempts=1,
            backoff_seconds=0,
        )
        end = time.monotonic()
    finally:
        with log_path.open("w") as fh:
            for t, line in logs.lines:
                fh.write(f"{t - start:8.2f}s {line}\n")
        engine.close()
        store.close()
    if finished.state is not JobState.SUCCEEDED or not finished.image or not finished.digest:
        raise RuntimeError(f"build job {finished.state}: {finished.error}; see {log_path}")

    result.end_to_end = end - start
    downloaded = first(lambda line: line.startswith("downloaded model"))
    result.download = downloaded - start if downloaded is not None else None
    result.build = engine.total("build")
    result.push = engine.total("push")
    assembled = first(lambda line: bool(ASSEMBLED.match(line)))
    smoke_end = first(lambda line: line.startswith("smoke test passed"))
    # The runner's last line of a build (on both paths), after the tag is set.
    published = first(lambda line: line.startswith("pushed "))

    if assembled is not None:
        result.path = "registry"
    elif first(lambda line: line.startswith(RUNTIME_BUILT)) is not None:
        result.path = "engine (runtime built)"
    elif first(lambda line: line.startswith(RUNTIME_REUSED)) is not None:
        result.path = "engine (runtime reused)"
    else:
        result.path = "engine"
    refused = next((line for _t, line in logs.lines if line.startswith(ASSEMBLY_REFUSED)), None)
    if refused:
        result.notes.append(refused[:300])

    # Smoke: from the end of the phase before it (the engine build, or the assembly, which
    # on that path is followed by pulling the untagged image) to "smoke test passed", so it
    # includes starting the container and, on the registry path, the pull it needs.
    smoke_from = assembled if assembled is not None else engine.last_end("build")
    if smoke_end is not None and smoke_from is not None:
        result.smoke = smoke_end - smoke_from
        pulled = engine.total("pull")
        if pulled is not None:
            result.notes.append(f"smoke includes {pulled:.1f} s pulling the assembled image")
    if assembled is not None and downloaded is not None:
        # Runtime key, previous digest lookup, model layer + config + manifest upload; then,
        # after any smoke test, the tag (one manifest PUT).
        tagged_from = smoke_end if smoke_end is not None else assembled
        tagged = (published - tagged_from) if published is not None else 0.0
        result.assemble = (assembled - downloaded) + max(tagged, 0.0)
        result.notes.append(
            "assembled in the registry on the previous version's layers: no engine build, no push"
        )
    result.image = finished.image
    result.digest = finished.digest
    result.registry_growth = registry.stored_bytes() - before
    repository, _, tag = finished.image.rpartition(":")
    if assembled is not None:
        # Untimed, after the measurement: the registry path never builds the image locally.
        # Pulling it gives its size and shows that the assembled image really is pullable.
        sdk_pull(client, repository, tag, registry.auth_config)
    result.image_size = image_size(client, finished.image)
    result.compressed_size = manifest_size(registry, repository.partition("/")[2], result.digest)
    return result


# --------------------------------------------------------------------------- report


def fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def fmt_b(value: int | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100 * MB:
        return f"{value / MB:.0f} MB"
    if abs(value) >= MB:
        return f"{value / MB:.1f} MB"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f} kB"
    return f"{value} B"


def ratio(stock: float | None, dock: float | None) -> str:
    if stock is None or dock is None:
        return "—"
    if dock <= 0:
        return "∞" if stock > 0 else "—"
    return f"{stock / dock:.1f}x"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_report(
    results: list[RunResult],
    *,
    machine: dict[str, str],
    artifacts_size: dict[str, int],
    setup: dict[str, str],
    total_seconds: float,
) -> str:
    def find(side: str, version: str) -> RunResult | None:
        return next((r for r in results if r.side == side and r.version == version), None)

    header = [
        "side",
        "version",
        "path",
        "download",
        "build",
        "push",
        "assemble",
        "smoke",
        "other",
        "end to end",
        "image size",
        "compressed",
        "registry growth",
    ]
    out = [
        "# Build speed: stock MLflow vs mlflow-dock",
        "",
        f"Run {datetime.now(UTC).isoformat(timespec='seconds')}, "
        f"total runtime {total_seconds / 60:.1f} min.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        row(header),
        row(["---"] * 3 + ["---:"] * (len(header) - 3)),
    ]

    def result_row(r: RunResult, name: str) -> str:
        if r.error:
            return row([name, r.version, f"FAILED: {r.error}"] + [""] * (len(header) - 3))
        return row(
            [
                name,
                r.version,
                r.path or "—",
                fmt_s(r.download),
                fmt_s(r.build),
                fmt_s(r.push),
                fmt_s(r.assemble),
                fmt_s(r.smoke),
                fmt_s(r.other),
                fmt_s(r.end_to_end),
                fmt_b(r.image_size),
                fmt_b(r.compressed_size),
                fmt_b(r.registry_growth),
            ]
        )

    for version in ("1", "2"):
        stock, dock = find("stock", version), find("mlflow-dock", version)
        if stock:
            out.append(result_row(stock, "stock"))
        if dock:
            out.append(result_row(dock, "mlflow-dock"))
        if stock and dock and not stock.error and not dock.error:
            out.append(
                row(
                    [
                        "**stock / mlflow-dock**",
                        version,
                        "",
                        ratio(stock.download, dock.download),
                        ratio(stock.build, dock.build),
                        ratio(stock.push, dock.push),
                        # stock's build + push against the registry path's one phase
                        ratio((stock.build or 0) + (stock.push or 0) or None, dock.assemble),
                        "",
                        "",
                        f"**{ratio(stock.end_to_end, dock.end_to_end)}**",
                        ratio(stock.image_size, dock.image_size),
                        ratio(stock.compressed_size, dock.compressed_size),
                        ratio(stock.registry_growth, dock.registry_growth),
                    ]
                )
            )
    smoke_run = find("mlflow-dock", "3")
    if smoke_run:
        out.append(result_row(smoke_run, "mlflow-dock, smoke test on"))

    out += [
        "",
        "Model artifacts (what a new version really adds): "
        + ", ".join(f"v{v} {fmt_b(size)} ({size} B)" for v, size in artifacts_size.items())
        + ".",
        "",
        "## Targets (reported, not asserted)",
        "",
    ]
    out += render_targets(find, artifacts_size)
    out += ["", "## Notes", ""]
    out += [f"- {key}: {value}" for key, value in setup.items()]
    for r in results:
        busy = (
            f"CPU {r.cpu_busy_before:.0%} busy before start"
            if r.cpu_busy_before is not None
            else ""
        )
        details = "; ".join(x for x in [busy, *r.notes] if x)
        if details:
            out.append(f"- {r.side} v{r.version}: {details}")
    out.append("")
    return "\n".join(out)


def render_targets(
    find: Callable[[str, str], RunResult | None], artifacts_size: dict[str, int]
) -> list[str]:
    lines: list[str] = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def ok(r: RunResult | None) -> bool:
        return r is not None and r.error is None

    s1, d1, s2, d2, d3 = (
        find("stock", "1"),
        find("mlflow-dock", "1"),
        find("stock", "2"),
        find("mlflow-dock", "2"),
        find("mlflow-dock", "3"),
    )
    if ok(s2) and ok(d2):
        assert s2 and d2 and s2.end_to_end and d2.end_to_end
        speedup = s2.end_to_end / d2.end_to_end
        lines.append(
            f"- Second version end to end ≥ 10x faster than stock: {speedup:.1f}x "
            f"({fmt_s(s2.end_to_end)} vs {fmt_s(d2.end_to_end)}) — {verdict(speedup >= 10)}"
        )
        if ok(d3):
            assert d3 and d3.end_to_end
            smoke_speedup = s2.end_to_end / d3.end_to_end
            lines.append(
                f"- Same with the smoke test on (version 3): {smoke_speedup:.1f}x "
                f"({fmt_s(d3.end_to_end)}) — {verdict(smoke_speedup >= 10)}"
            )
    if ok(d2) and d2 and d2.registry_growth is not None:
        allowance = artifacts_size.get("2", 0) + MB
        lines.append(
            f"- Registry growth for the second version ≤ model artifacts + 1 MB "
            f"({fmt_b(allowance)}): {fmt_b(d2.registry_growth)} — "
            f"{verdict(d2.registry_growth <= allowance)} (stock: "
            f"{fmt_b(s2.registry_growth) if s2 else '—'})"
        )
    if ok(s1) and ok(d1) and s1 and d1 and s1.build and d1.build:
        share = d1.build / s1.build
        e2e_share = (d1.end_to_end or 0) / (s1.end_to_end or 1)
        lines.append(
            f"- Cold build at most half of stock's: {share:.0%} of stock's build time "
            f"({fmt_s(d1.build)} vs {fmt_s(s1.build)}; end to end {e2e_share:.0%}) — "
            f"{verdict(share <= 0.5)}"
        )
    if ok(s1) and ok(d1) and s1 and d1 and s1.image_size and d1.image_size:
        share = d1.image_size / s1.image_size
        lines.append(
            f"- Image at most 60 % of stock's size: {share:.0%} "
            f"({fmt_b(d1.image_size)} vs {fmt_b(s1.image_size)}) — {verdict(share <= 0.6)}"
        )
    return lines or ["- not enough successful runs to judge"]


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wait-quiet",
        type=float,
        nargs="?",
        const=900.0,
        default=900.0,
        metavar="SECONDS",
        help="before each measured run, wait up to this many seconds (900 if given without a "
        "value, and by default) for other CPU/docker activity on the machine to stop (0: do "
        "not wait)",
    )
    parser.add_argument("--quiet-threshold", type=float, default=0.25, help="CPU busy share")
    parser.add_argument("--keep-images", action="store_true", help="keep built images at exit")
    parser.add_argument("--keep-workdir", action="store_true", help="keep registry/MLflow data")
    args = parser.parse_args()

    started = time.monotonic()
    run_id = uuid.uuid4().hex[:12]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    client = docker.from_env(timeout=3600)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-dock-bench-"))
    registry: RegistryServer | None = None
    mlflow_server: MlflowServer | None = None
    results: list[RunResult] = []
    try:
        machine = machine_info(client)
        print("machine:", json.dumps(machine))

        print("setup: removing images of earlier bench runs...", flush=True)
        removed = remove_bench_images(client)
        print("setup: base image, registry, MLflow server...", flush=True)
        base_image = ensure_base_image()
        bench_base = build_bench_base(client, base_image, run_id)
        registry = start_registry(workdir / "registry", "bench", uuid.uuid4().hex)
        mlflow_server = start_mlflow_server(workdir / "mlflow")
        # As a deployment would. Needed, not cosmetic: MLflow 3.17 resolves `models:/`
        # downloads through the process-global registry URI and ignores
        # download_artifacts(registry_uri=...), so without it stock's generate-dockerfile and
        # the setup downloads below would look in (and create) ./mlflow.db in the cwd.
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url

        print("setup: registering 3 versions of the model...", flush=True)
        versions = [log_sklearn_model(mlflow_server.url, MODEL_NAME) for _ in range(3)]
        if versions != ["1", "2", "3"]:
            raise RuntimeError(f"expected versions 1..3 of a fresh model, got {versions}")

        from mlflow.artifacts import download_artifacts

        artifacts_size: dict[str, int] = {}
        python_version = ""
        for version in versions:
            local = Path(
                download_artifacts(
                    artifact_uri=f"models:/{MODEL_NAME}/{version}",
                    dst_path=str(workdir / "artifacts" / version),
                    tracking_uri=mlflow_server.url,
                    registry_uri=mlflow_server.url,
                )
            )
            artifacts_size[version] = directory_size(local)
            python_version = model_python_version(local)
        # Stock picks its base from the model's python_env.yaml (PYTHON_SLIM_BASE_IMAGE).
        stand_in = f"python:{python_version}-slim"
        print(f"setup: stand-in {stand_in} FROM {bench_base}...", flush=True)
        build_stand_in(client, bench_base, stand_in)
        seed_registry(client, registry, {"debian": bench_base, "python": stand_in})

        setup = {
            "stock offline": f"generated Dockerfile unchanged (`FROM {stand_in}`); {stand_in} is "
            f"a local stand-in built FROM {base_image} (+ label {BENCH_LABEL}) with a venv at "
            "/usr/local for `python`/`pip` and the host CA bundle + `ENV PIP_CERT` baked in; "
            "nginx comes from the Debian mirror over `--network host`",
            "mlflow-dock": "in-process, as the service runs a job: `store.request_build` + "
            "`store.claim_next` in the service's JobStore, then `worker.execute_job` with "
            "`Components(settings).runner` (one attempt), which records each version's "
            "image and digest in that store, so a later version of the same runtime can be "
            f"assembled in the registry; base_image {bench_base} (the same Debian layer), "
            "build_ca_bundle + build_network=host",
            "builds": "classic builder on both sides (stock: `DOCKER_BUILDKIT=0 docker build "
            "--platform linux/amd64 --network host`, MLflow's own argv + network); pushes via "
            "the Docker SDK with per-call credentials",
            "cold start": f"removed {removed} image(s) of earlier bench runs; fresh bench base "
            "id, so no classic-builder cache applies to version 1 on either side",
            "registry": "one local CNCF Distribution, repositories stock/… and the default "
            "mlflow-dock one; base image layers pushed (untimed) beforehand, as on Docker Hub",
            "columns": "path = how the image got to the registry (engine: local build + push; "
            "registry: assembled in the registry on the previous version's layers, read from "
            "the build logs); download = job bookkeeping + model fetch (stock: "
            "generate-dockerfile incl. backend lookup); assemble = registry path only: runtime "
            "key, previous-digest lookup, model layer + config + manifest upload and the tag "
            "(its ratio is stock's build + push over it); smoke = container start to `smoke "
            "test passed`, incl. pulling the assembled image on the registry path; other = rest "
            "of end to end (metadata, runtime-key hashing, context tar, recording the job); "
            "image size = `docker image inspect` Size, base included "
            f"({fmt_b(image_size(client, bench_base))} Debian base); compressed = config + "
            "layer blobs in the pushed manifest; registry growth = stored blob bytes delta; "
            "MB = 10^6 B",
            "logs": f"{LOG_DIR.relative_to(REPO_ROOT)}/",
            "mlflow-dock code": code_state(),
        }

        data_dir = workdir / "mlflow-dock-data"
        plan: list[tuple[str, str, bool]] = [
            ("stock", "1", False),
            ("stock", "2", False),
            ("mlflow-dock", "1", False),
            ("mlflow-dock", "2", False),
            ("mlflow-dock", "3", True),
        ]
        for side, version, smoke in plan:
            busy = (
                wait_until_quiet(client, args.wait_quiet, args.quiet_threshold)
                if args.wait_quiet > 0
                else None
            )
            print(f"run: {side} v{version}{' (smoke test on)' if smoke else ''}...", flush=True)
            try:
                if side == "stock":
                    result = run_stock(
                        client,
                        registry,
                        mlflow_server,
                        version=version,
                        workdir=workdir,
                        expected_from=stand_in,
                    )
                else:
                    settings = dock_settings(
                        registry,
                        mlflow_server,
                        data_dir=data_dir,
                        base_image=bench_base,
                        smoke_test=smoke,
                    )
                    result = run_dock(client, registry, settings, version=version)
            except Exception as exc:
                # One side failing (e.g. a fast path under development) must not lose the
                # other side's numbers.
                traceback.print_exc()
                result = RunResult(side=side, version=version, error=f"{type(exc).__name__}")
                result.notes.append(str(exc).splitlines()[0][:300] if str(exc) else "")
            result.cpu_busy_before = busy
            results.append(result)
            print(
                f"  {result.path or 'no path'}: end to end {fmt_s(result.end_to_end)} (build "
                f"{fmt_s(result.build)}, push {fmt_s(result.push)}, assemble "
                f"{fmt_s(result.assemble)}, smoke {fmt_s(result.smoke)}), image "
                f"{fmt_b(result.image_size)}, "
                f"registry +{fmt_b(result.registry_growth)}",
                flush=True,
            )

        report = render_report(
            results,
            machine=machine,
            artifacts_size=artifacts_size,
            setup=setup,
            total_seconds=time.monotonic() - started,
        )
        print()
        print(report)
        (RESULTS_DIR / "latest.md").write_text(report)
        print(f"written to {(RESULTS_DIR / 'latest.md').relative_to(REPO_ROOT)}")
        return 0 if all(r.error is None for r in results) else 1
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
        if registry is not None:
            registry.stop()
        if not args.keep_images:
            remove_bench_images(client)
        client.close()
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
