"""Alias latency: an alias set in MLflow -> its tag visible in the registry, end to end.

Usage (from the repository root, as root, with the Docker Engine running)::

    .venv/bin/python bench/alias_latency.py [--n 10] [--modes new,moved,busy] [--busy-builds 3]
        [--service-src DIR] [--label NAME] [--wait-quiet [SECONDS]] [--keep-workdir]

Everything is real and runs as a user would run it: a local CNCF Distribution registry, an
MLflow server (SQLite backend, webhooks delivered by MLflow itself), and ``mlflow-dock serve``
as a separate process (smoke test off, builds on the host network). A webhook for
``model_version.created`` and ``model_version_alias.created`` points at the service. Two versions
of one model are registered and built by the service (version 1 with the engine, version 2
usually assembled in the registry), then, N times each:

* new alias: ``set_registered_model_alias(name, f"a{i}", "1")``, a tag that does not exist yet;
* moved alias: ``champion`` moved between versions 1 and 2, i.e. an existing tag re-pointed;
* busy: a new alias on version 1 while builds run: ``--busy-builds`` new versions are registered
  at once (each a real build: an assembly in the registry, SBOM attached), and the alias is set
  as soon as one of them runs on the only build slot and the others wait. Each sample waits for
  those builds to finish before the next, and counts the builds the alias overtook (arrived
  before it, finished after its tag).

``--service-src DIR`` runs the service from another source tree (``PYTHONPATH``), e.g. an
export of ``main`` (``git archive main src | tar -x -C /tmp/main``), to measure before and after
a change on the same machine with the same script; ``--label`` names the result file.

After each call the registry is polled (``RegistryClient.manifest_digest``, HEAD, every ~10 ms)
until the alias tag points at the version's digest. The alias job's ``created_at``,
``started_at`` and ``finished_at`` (``GET /builds``) split the time into MLflow's part (the
API call, then the asynchronous webhook delivery until mlflow-dock has stored the job) and
mlflow-dock's part (queue wait, then the tag: one manifest GET and one PUT). All processes run on
this machine, so wall clocks of this script and the service are the same clock.

Prints markdown tables and writes them to ``bench/results/alias-latency[-LABEL].md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (REPO_ROOT / "src", REPO_ROOT / "bench", REPO_ROOT / "tests"):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import docker  # noqa: E402
from build_speed import code_state, cpu_busy, machine_info  # noqa: E402

from mlflow_dock.oci.reference import alias_tag  # noqa: E402
from mlflow_dock.oci.remote import RegistryClient  # noqa: E402
from support import web  # noqa: E402
from support.servers import (  # noqa: E402
    MlflowServer,
    RegistryServer,
    ServiceProcess,
    ensure_base_image,
    log_sklearn_model,
    register_model_version,
    service_environment,
    start_mlflow_server,
    start_registry,
    start_service,
)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_FILE = RESULTS_DIR / "alias-latency.md"
MODEL_NAME = "alias-latency-iris"
TARGET_MS = 1000.0
# Issue 17: an alias set while builds run (one on the slot, others waiting) is a tag this soon.
BUSY_TARGET_MS = 500.0


# --------------------------------------------------------------------------- measurements


@dataclass
class Sample:
    mode: str  # "new alias" | "moved alias" | "busy"
    alias: str
    version: str
    cpu_busy_before: float
    call_ms: float  # set_registered_model_alias round trip
    total_ms: float  # call start -> registry HEAD shows the expected digest
    delivery_ms: float  # call start -> alias job stored by mlflow-dock (MLflow's part)
    queued_ms: float  # job stored -> job claimed by a worker
    run_ms: float  # job claimed -> job recorded as succeeded (registry GET + PUT, bookkeeping)
    polls: int
    # busy: builds running or queued when the alias was set, and those of them that finished
    # after the alias was tagged (the alias overtook them).
    builds_busy: int | None = None
    builds_overtaken: int | None = None

    @property
    def dock_ms(self) -> float:
        return self.queued_ms + self.run_ms

    @property
    def seen_after_ms(self) -> float:
        """Observed total minus delivery and mlflow-dock: the poll's lag (< 0: the tag was
        visible before the job was recorded as finished, as the PUT precedes the record)."""
        return self.total_ms - self.delivery_ms - self.dock_ms


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def parse_time(value: str | None) -> float:
    if value is None:
        raise RuntimeError("job has no timestamp where one was expected")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# --------------------------------------------------------------------------- service API


def list_jobs(service: ServiceProcess) -> list[dict[str, Any]]:
    response = web.get(
        f"{service.url}/builds", params={"model": MODEL_NAME, "limit": 1000}, timeout=10
    )
    response.raise_for_status()
    jobs: list[dict[str, Any]] = response.json()
    return jobs


def wait_for_job(
    service: ServiceProcess,
    *,
    kind: str,
    version: str,
    alias: str | None = None,
    created_after: float = 0.0,
    timeout: float,
    interval: float = 0.2,
) -> dict[str, Any]:
    """The newest matching job once it has succeeded; raises if it failed or never came."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        for job in list_jobs(service):  # newest first
            if job["kind"] != kind or job["version"] != version or job["alias"] != alias:
                continue
            if parse_time(job["created_at"]) < created_after:
                continue
            last = job
            if job["state"] == "succeeded":
                return job
            if job["state"] == "failed":
                raise RuntimeError(f"{kind} job {job['id']} failed: {job['error']}")
            break
        time.sleep(interval)
    state = f"last seen {last['state']}" if last else "never created"
    raise RuntimeError(
        f"{kind} job for version {version}{f' alias {alias}' if alias else ''} did not succeed "
        f"within {timeout:.0f} s ({state}); service log {service.log_path}"
    )


# --------------------------------------------------------------------------- machine


def wait_for_cpu(max_wait: float, threshold: float) -> float:
    """Wait (up to max_wait) until other work on this shared machine leaves the CPU idle.

    Only CPU counts here, not running containers as in build_speed.py: nothing in this
    benchmark runs a container, and an idle container someone else left running costs no
    latency, while a build or a test suite shows up as CPU.
    """
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        busy = cpu_busy(1.0)
        if busy < threshold or time.monotonic() > deadline:
            if announced:
                print(f"  CPU {busy:.0%} busy, going on", flush=True)
            return busy
        if not announced:
            print(
                f"  waiting for a quiet CPU ({busy:.0%} busy; up to {max_wait:.0f}s)...",
                flush=True,
            )
            announced = True
        time.sleep(2)


# --------------------------------------------------------------------------- one sample


def measure(
    *,
    mlflow_client: Any,
    registry_client: RegistryClient,
    repository_path: str,
    service: ServiceProcess,
    mode: str,
    alias: str,
    version: str,
    expected_digest: str,
    cpu_busy_before: float,
    poll_interval: float,
    timeout: float,
) -> Sample:
    tag = alias_tag(alias)
    if registry_client.manifest_digest(repository_path, tag) == expected_digest:
        raise RuntimeError(f"{tag} already points at {expected_digest}: nothing to measure")
    wall0 = time.time()
    start = time.monotonic()
    mlflow_client.set_registered_model_alias(MODEL_NAME, alias, version)
    returned = time.monotonic()
    polls = 0
    while True:
        polls += 1
        if registry_client.manifest_digest(repository_path, tag) == expected_digest:
            seen = time.monotonic()
            break
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{tag} did not point at {expected_digest} within {timeout:.0f} s")
        time.sleep(poll_interval)
    job = wait_for_job(
        service,
        kind="alias",
        version=version,
        alias=alias,
        # Same machine, same clock; the margin only guards against rounding in the API.
        created_after=wall0 - 0.05,
        timeout=30,
        interval=0.05,
    )
    if job["digest"] != expected_digest:
        raise RuntimeError(f"alias job {job['id']} recorded {job['digest']}, not {expected_digest}")
    created = parse_time(job["created_at"])
    started = parse_time(job["started_at"])
    finished = parse_time(job["finished_at"])
    return Sample(
        mode=mode,
        alias=alias,
        version=version,
        cpu_busy_before=cpu_busy_before,
        call_ms=(returned - start) * 1000,
        total_ms=(seen - start) * 1000,
        delivery_ms=(created - wall0) * 1000,
        queued_ms=(started - created) * 1000,
        run_ms=(finished - started) * 1000,
        polls=polls,
    )


# --------------------------------------------------------------------------- report


def fmt_ms(value: float) -> str:
    return f"{value:.0f} ms"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


MEASURES: list[tuple[str, str]] = [
    ("**end to end: alias set → tag visible**", "total_ms"),
    ("MLflow: `set_registered_model_alias` call (within delivery)", "call_ms"),
    ("MLflow: delivery (call start → job stored in mlflow-dock)", "delivery_ms"),
    ("mlflow-dock: job stored → job finished", "dock_ms"),
    ("↳ queued (stored → claimed by a worker)", "queued_ms"),
    ("↳ running (tag: manifest GET + PUT, recording)", "run_ms"),
    ("poll lag (end to end - delivery - mlflow-dock)", "seen_after_ms"),
]


def render_report(
    samples: list[Sample],
    *,
    machine: dict[str, str],
    notes: dict[str, str],
    warmup: Sample | None,
) -> str:
    modes = list(dict.fromkeys(s.mode for s in samples))
    groups = [(mode, [s for s in samples if s.mode == mode]) for mode in modes]
    if len(modes) > 1:
        groups.append(("all", samples))
    out = [
        "# Alias latency: MLflow alias set → tag visible in the registry",
        "",
        f"Run {datetime.now(UTC).isoformat(timespec='seconds')}.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        row(["aliases", "n", "measure", "min", "median", "p90", "max"]),
        row(["---", "---:", "---", "---:", "---:", "---:", "---:"]),
    ]
    for mode, group in groups:
        for title, attribute in MEASURES:
            values = [float(getattr(s, attribute)) for s in group]
            out.append(
                row(
                    [
                        mode,
                        str(len(group)),
                        title,
                        fmt_ms(min(values)),
                        fmt_ms(statistics.median(values)),
                        fmt_ms(percentile(values, 0.9)),
                        fmt_ms(max(values)),
                    ]
                )
            )
    totals = [s.total_ms for s in samples]
    worst = max(totals)
    median_total = statistics.median(totals)
    delivery_share = statistics.median(s.delivery_ms / s.total_ms for s in samples)
    dock_share = statistics.median(s.dock_ms / s.total_ms for s in samples)
    out += [
        "",
        f"Target: end to end < {TARGET_MS:.0f} ms — "
        + ("met" if worst < TARGET_MS else "**missed**")
        + f" (median {fmt_ms(median_total)}, p90 {fmt_ms(percentile(totals, 0.9))}, "
        f"max {fmt_ms(worst)}, n = {len(samples)}). Median shares of end to end: MLflow "
        f"delivery {delivery_share:.0%}, mlflow-dock {dock_share:.0%}.",
    ]
    busy = [s.total_ms for s in samples if s.builds_busy is not None]
    if busy:
        out.append(
            f"While builds run: end to end < {BUSY_TARGET_MS:.0f} ms — "
            + ("met" if max(busy) < BUSY_TARGET_MS else "**missed**")
            + f" (median {fmt_ms(statistics.median(busy))}, max {fmt_ms(max(busy))}, "
            f"n = {len(busy)})."
        )
    out += [
        "",
        "## Samples",
        "",
        row(
            [
                "#",
                "aliases",
                "alias → version",
                "CPU busy before",
                "end to end",
                "call",
                "delivery",
                "queued",
                "running",
                "polls",
                "builds busy / overtaken",
            ]
        ),
        row(["---:", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for index, s in enumerate(samples, start=1):
        out.append(
            row(
                [
                    str(index),
                    s.mode,
                    f"{s.alias} → v{s.version}",
                    f"{s.cpu_busy_before:.0%}",
                    fmt_ms(s.total_ms),
                    fmt_ms(s.call_ms),
                    fmt_ms(s.delivery_ms),
                    fmt_ms(s.queued_ms),
                    fmt_ms(s.run_ms),
                    str(s.polls),
                    "-" if s.builds_busy is None else f"{s.builds_busy} / {s.builds_overtaken}",
                ]
            )
        )
    out += ["", "## Notes", ""]
    if warmup is not None:
        out.append(
            f"- warm-up (not counted): alias {warmup.alias} → v{warmup.version} took "
            f"{fmt_ms(warmup.total_ms)} (delivery {fmt_ms(warmup.delivery_ms)}, mlflow-dock "
            f"{fmt_ms(warmup.dock_ms)})"
        )
    out += [f"- {key}: {value}" for key, value in notes.items()]
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def remove_local_images(client: docker.DockerClient, registry_host: str) -> int:
    """Remove the version images the service built for this run's registry (unique port)."""
    removed = 0
    for image in client.images.list():
        for tag in image.tags:
            if tag.startswith(f"{registry_host}/"):
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(tag)
                    removed += 1
    return removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="samples per alias mode")
    parser.add_argument(
        "--modes",
        default="new,moved,busy",
        help="comma-separated: new (a fresh alias a<i> each time), moved (champion moved "
        "between versions 1 and 2), busy (a fresh alias b<i> while builds run)",
    )
    parser.add_argument(
        "--busy-builds",
        type=int,
        default=3,
        help="busy: versions registered at once before each sample (one runs, the rest wait)",
    )
    parser.add_argument(
        "--service-src",
        type=Path,
        help="run the service from this source tree (its `src`, put first on PYTHONPATH)",
    )
    parser.add_argument("--label", help="suffix of the result file (alias-latency-LABEL.md)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        nargs="?",
        const=900.0,
        default=900.0,
        metavar="SECONDS",
        help="before setup and before each sample, wait up to this many seconds (900 if given "
        "without a value, and by default) for the CPU to be quiet (0: do not wait)",
    )
    parser.add_argument("--quiet-threshold", type=float, default=0.25, help="CPU busy share")
    parser.add_argument("--poll-interval", type=float, default=0.01, help="registry poll, s")
    parser.add_argument("--timeout", type=float, default=30.0, help="per sample, s")
    parser.add_argument("--keep-workdir", action="store_true", help="keep servers' data/logs")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"new", "moved", "busy"}:
        parser.error("--modes takes new, moved and/or busy")
    if args.busy_builds < 2:
        parser.error("--busy-builds: at least 2 (one running, one waiting)")
    service_src = args.service_src.resolve() if args.service_src else None
    if service_src is not None and not (service_src / "mlflow_dock").is_dir():
        parser.error(f"--service-src: no mlflow_dock package in {service_src}")
    result_file = RESULTS_DIR / (
        f"alias-latency-{args.label}.md" if args.label else RESULT_FILE.name
    )

    client = docker.from_env(timeout=600)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-dock-alias-latency-"))
    registry: RegistryServer | None = None
    mlflow_server: MlflowServer | None = None
    service: ServiceProcess | None = None
    mlflow_client: Any = None
    webhook_id: str | None = None

    def quiet() -> float:
        if args.wait_quiet <= 0:
            return cpu_busy(1.0)
        return wait_for_cpu(args.wait_quiet, args.quiet_threshold)

    try:
        machine = machine_info(client)
        print("machine:", json.dumps(machine), flush=True)
        print("setup: base image, registry, MLflow server...", flush=True)
        base_image = ensure_base_image()
        registry = start_registry(workdir / "registry", "alias", secrets.token_urlsafe(18))
        mlflow_server = start_mlflow_server(workdir / "mlflow")
        secret = secrets.token_urlsafe(32)
        # The tests' service environment, on the host network and without smoke tests.
        env = service_environment(
            registry,
            mlflow_server,
            secret=secret,
            data_dir=workdir / "service" / "data",
            base_image=base_image,
            MLFLOW_DOCK_BUILD_NETWORK="host",
            MLFLOW_DOCK_SMOKE_TEST="false",
        )
        if service_src is not None:
            env["PYTHONPATH"] = str(service_src)
        print("setup: mlflow-dock service...", flush=True)
        service = running = start_service(env, workdir / "service")
        ready = web.get(f"{service.url}/ready", timeout=10).json()
        print(f"  /ready checks: {ready['checks']}", flush=True)

        from mlflow import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        hook = mlflow_client.create_webhook(
            name=f"alias-latency-{uuid.uuid4().hex[:8]}",
            url=f"{service.url}/webhook",
            events=["model_version.created", "model_version_alias.created"],
            secret=secret,
        )
        webhook_id = hook.webhook_id
        # MLflow caches the webhook list per event (1 s TTL on the test server).
        time.sleep(1.5)

        print("setup: registering and building versions 1 and 2...", flush=True)
        v1 = log_sklearn_model(mlflow_server.url, MODEL_NAME)
        build1 = wait_for_job(service, kind="build", version=v1, timeout=1800, interval=1)
        v2 = register_model_version(
            mlflow_server.url, MODEL_NAME, from_model=MODEL_NAME, from_version=v1
        )
        build2 = wait_for_job(service, kind="build", version=v2, timeout=1800, interval=1)
        digests = {v1: build1["digest"], v2: build2["digest"]}
        if digests[v1] == digests[v2]:
            raise RuntimeError("versions 1 and 2 have the same digest: a move would not show")
        host, _, rest = str(build1["image"]).partition("/")
        repository_path = rest.rpartition(":")[0]
        builds = {v: f"{b['duration_seconds']:.1f} s" for v, b in ((v1, build1), (v2, build2))}
        print(f"  built: {builds}; repository {host}/{repository_path}", flush=True)

        registry_client = RegistryClient(
            host, username=registry.username, password=registry.password
        )
        plan: list[tuple[str, str, str]] = []  # (mode, alias, version)
        if "new" in modes:
            plan += [("new alias", f"a{i}", v1) for i in range(args.n)]
        if "moved" in modes:
            # champion starts on v1 (the warm-up below), so the first move goes to v2.
            plan += [("moved alias", "champion", v2 if i % 2 == 0 else v1) for i in range(args.n)]
        if "busy" in modes:
            plan += [("busy", f"b{i}", v1) for i in range(args.n)]

        def start_builds() -> tuple[list[str], int]:
            """Register versions until one builds and others wait; their builds in flight."""
            versions = [
                register_model_version(
                    mlflow_server.url, MODEL_NAME, from_model=MODEL_NAME, from_version=v1
                )
                for _ in range(args.busy_builds)
            ]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                states = [
                    j["state"]
                    for j in list_jobs(running)
                    if j["kind"] == "build" and j["version"] in versions
                ]
                if "running" in states and "queued" in states:
                    return versions, states.count("running") + states.count("queued")
                time.sleep(0.01)
            raise RuntimeError(
                f"builds of {versions} never had one running and one waiting ({states}): "
                "raise --busy-builds"
            )

        def overtaken(versions: list[str], alias_finished: float) -> int:
            ended = [
                wait_for_job(running, kind="build", version=v, timeout=600, interval=0.5)
                for v in versions
            ]
            return sum(parse_time(j["finished_at"]) > alias_finished for j in ended)

        def sample(mode: str, alias: str, version: str) -> Sample:
            busy = quiet()
            in_flight: list[str] = []
            builds_busy = None
            if mode == "busy":
                in_flight, builds_busy = start_builds()
            result = measure(
                mlflow_client=mlflow_client,
                registry_client=registry_client,
                repository_path=repository_path,
                service=running,
                mode=mode,
                alias=alias,
                version=version,
                expected_digest=digests[version],
                cpu_busy_before=busy,
                poll_interval=args.poll_interval,
                timeout=args.timeout,
            )
            if in_flight:
                alias_job = wait_for_job(
                    running, kind="alias", version=version, alias=alias, timeout=30
                )
                result.builds_busy = builds_busy
                result.builds_overtaken = overtaken(in_flight, parse_time(alias_job["finished_at"]))
            print(
                f"  {mode}: {alias} -> v{version}: {fmt_ms(result.total_ms)} (delivery "
                f"{fmt_ms(result.delivery_ms)}, mlflow-dock {fmt_ms(result.dock_ms)}; CPU "
                f"{busy:.0%}"
                + (
                    f"; builds in flight {result.builds_busy}, overtaken {result.builds_overtaken}"
                    if in_flight
                    else ""
                )
                + ")",
                flush=True,
            )
            # Let the write-back of the finished job (MLflow tags) settle before the next.
            time.sleep(0.5)
            return result

        print("warm-up (not counted): champion -> v1", flush=True)
        warmup = sample("warm-up", "champion", v1)
        samples = [sample(mode, alias, version) for mode, alias, version in plan]

        notes = {
            "setup": "local CNCF Distribution (htpasswd auth) + `mlflow server` (SQLite, "
            "--workers 1, webhooks delivered by MLflow's own thread pool, webhook cache TTL "
            "1 s) + `mlflow-dock serve` (separate process, defaults but smoke test off and "
            "host-network builds; write-back to MLflow on), all on this machine",
            "model": f"{MODEL_NAME}: v{v1} logged (sklearn), v{v2} registered from the same "
            f"artifacts; builds took {builds[v1]} and {builds[v2]}",
            "measurement": "end to end = `set_registered_model_alias` call start → registry "
            f"HEAD of the alias tag returns the version's digest (polled every "
            f"{args.poll_interval * 1000:.0f} ms, one RegistryClient with its auth cached); "
            "delivery = call start → the alias job's created_at (MLflow stores the alias, "
            "hands the event to its delivery thread pool, POSTs it; mlflow-dock verifies, "
            "parses and stores it); queued = created_at → started_at (worker wake-up and "
            "claim); running = started_at → finished_at (manifest GET by digest, PUT by tag, "
            "recording the job); job times from `GET /builds`, same machine and clock",
            "statistics": "p90 is nearest-rank (the 9th of 10 values)",
            "quiet machine": f"each sample waited for CPU busy < {args.quiet_threshold:.0%} "
            f"(1 s sample, up to {args.wait_quiet:.0f} s); other users' work can still start "
            "mid-sample",
            "mlflow-dock code": (
                f"service run from {service_src} (PYTHONPATH)"
                if service_src is not None
                else code_state()
            ),
            "service's /ready checks": ", ".join(ready["checks"]),
        }
        if "busy" in modes:
            notes["busy"] = (
                f"before each busy sample, {args.busy_builds} versions of {MODEL_NAME} were "
                "registered (each a real build: assembled in the registry, SBOM attached, on "
                "`MLFLOW_DOCK_BUILD_CONCURRENCY=1`, the default) and the alias was set once one "
                "of their builds ran and another waited; 'builds busy / overtaken' = builds "
                "running or queued when it was set / those that finished after its tag"
            )
        report = render_report(samples, machine=machine, notes=notes, warmup=warmup)
        print()
        print(report)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        result_file.write_text(report)
        print(f"written to {result_file.relative_to(REPO_ROOT)}")
        return 0
    finally:
        if mlflow_client is not None and webhook_id is not None:
            with contextlib.suppress(Exception):
                mlflow_client.delete_webhook(webhook_id)
        if service is not None:
            service.stop()
        if mlflow_server is not None:
            mlflow_server.stop()
        if registry is not None:
            registry.stop()
            remove_local_images(client, registry.host)
        client.close()
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
