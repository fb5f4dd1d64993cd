"""V2 latency and what the Open Inference Protocol and Modelcars cost, on a real image.

Usage (from the repository root, as root, with the Docker Engine running)::

    .venv/bin/python bench/v2_latency.py [--n 500] [--wait-quiet SECONDS] [--keep-workdir]

Everything runs for real on this machine: a local CNCF Distribution registry, an MLflow server,
``mlflow-dock serve`` (default native builder, smoke test off, ``MLFLOW_DOCK_MODELCAR=true`` on
Debian's static busybox). Three versions of one scikit-learn iris model are built through the
webhook: version 1 natively, versions 2 and 3 (the same artifacts registered again) assembled in
the registry. Then:

* **latency**: version 1's image runs once (``docker run``, host network, ``$PORT``); for 1 and
  100 rows, ``POST /invocations`` (``dataframe_split``) and ``POST /v2/models/<name>/infer``
  (JSON tensors, and binary tensor data as Triton's client sends it) are sent alternately by
  one httpx client, bodies prepared beforehand, N each after a warm-up: the same container, the
  same run, the same rows. p50 and p99 are nearest-rank.
* **size**: the serving layer's compressed size in the image, and that every version and the
  Modelcars name the same blob (so a new version adds none of it); the registry's growth per
  assembled version (blob bytes on disk, before/after the job).
* **Modelcar**: the time the Modelcar step adds to a version (``ImageCompanions.publish`` with
  Modelcars on, minus with them off, which still reads the image's config for its V2 name),
  run in this process against version 3's image under fresh tags, N times; what one Modelcar
  adds to the registry (its config and manifest; the busybox blob is there already); and the
  one-off upload of the busybox blob to a repository that has none.

Prints markdown and writes it to ``bench/results/v2-latency.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (REPO_ROOT / "src", REPO_ROOT / "bench", REPO_ROOT / "tests"):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import docker  # noqa: E402
import httpx  # noqa: E402
from alias_latency import wait_for_cpu  # noqa: E402
from build_speed import code_state, cpu_busy, machine_info  # noqa: E402
from stack import BUSYBOX, Stack, webhook_stack  # noqa: E402

from mlflow_dock.imaging.modelcar import (  # noqa: E402
    BusyboxModelcars,
    ImageCompanions,
    NoModelcars,
    busybox_from,
)
from mlflow_dock.oci.reference import ImageRef, modelcar_tag  # noqa: E402
from mlflow_dock.oci.remote import RegistryClient  # noqa: E402
from mlflow_dock.serving.layer import v2_infer_path  # noqa: E402
from support import web  # noqa: E402
from support.servers import (  # noqa: E402
    RegistryServer,
    ServiceProcess,
    free_port,
    log_sklearn_model,
    register_model_version,
)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_FILE = RESULTS_DIR / "v2-latency.md"
MODEL_NAME = "v2-latency-iris"
COLUMNS = ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)")
LATENCY_TARGET = 0.10  # V2 may add at most 10 % over /invocations, p50 and p99
LAYER_TARGET = 1_000_000  # bytes the serving layer may add to an image
MODELCAR_TIME_TARGET = 0.2  # seconds a Modelcar may add to a version's build
MODELCAR_BYTES_TARGET = 10_000  # registry bytes a Modelcar may add per version


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def wait_for_build(service: ServiceProcess, version: str, timeout: float) -> dict[str, Any]:
    """The version's build job once it succeeded; raises if it failed or never came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = web.get(
            f"{service.url}/builds", params={"model": MODEL_NAME, "limit": 100}, timeout=10
        )
        response.raise_for_status()
        for job in response.json():
            if job["kind"] == "build" and job["version"] == version:
                if job["state"] == "succeeded":
                    return dict(job)
                if job["state"] == "failed":
                    raise RuntimeError(f"build of version {version} failed: {job['error']}")
        time.sleep(0.2)
    raise RuntimeError(f"build of version {version} not done in {timeout:.0f} s")


# --------------------------------------------------------------------------- request bodies


def rows(count: int) -> list[list[float]]:
    from sklearn.datasets import load_iris

    features, _ = load_iris(return_X_y=True)
    picked = [features[i % len(features)] for i in range(0, count * 7, 7)]
    return [[float(v) for v in row] for row in picked]


def invocations_body(data: list[list[float]]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": list(COLUMNS), "data": data}}).encode()


def v2_json_body(data: list[list[float]]) -> bytes:
    inputs = [
        {"name": name, "datatype": "FP64", "shape": [len(data)], "data": [r[i] for r in data]}
        for i, name in enumerate(COLUMNS)
    ]
    return json.dumps({"inputs": inputs}).encode()


def v2_binary_body(data: list[list[float]]) -> tuple[bytes, dict[str, str]]:
    """Triton's binary tensor data extension, as tritonclient sends it by default."""
    inputs, blobs = [], []
    for i, name in enumerate(COLUMNS):
        raw = struct.pack(f"<{len(data)}d", *(r[i] for r in data))
        inputs.append(
            {
                "name": name,
                "datatype": "FP64",
                "shape": [len(data)],
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        blobs.append(raw)
    header = json.dumps(
        {"inputs": inputs, "outputs": [{"name": "output-0", "parameters": {"binary_data": True}}]}
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + b"".join(blobs), headers


# --------------------------------------------------------------------------- latency


def measure_latency(
    url: str, model: str, version: str, n: int, sizes: tuple[int, ...]
) -> dict[int, dict[str, list[float]]]:
    infer = url + v2_infer_path(model, version)
    results: dict[int, dict[str, list[float]]] = {}
    with httpx.Client(timeout=60) as client:
        for size in sizes:
            data = rows(size)
            requests = requests_for(client, url, infer, data)
            for response in (call() for call in requests.values()):
                response.raise_for_status()
            check_same_predictions(requests, size)
            for _ in range(max(20, n // 10)):  # warm-up: caches, allocator, branch predictors
                for call in requests.values():
                    call()
            samples: dict[str, list[float]] = {name: [] for name in requests}
            order = list(requests.items())
            for i in range(n):
                # Rotated each round: none always runs right after the same neighbour.
                shift = i % len(order)
                for name, call in order[shift:] + order[:shift]:
                    start = time.perf_counter()
                    call().raise_for_status()
                    samples[name].append((time.perf_counter() - start) * 1000)
            results[size] = samples
    return results


def requests_for(
    client: httpx.Client, url: str, infer: str, data: list[list[float]]
) -> dict[str, Callable[[], httpx.Response]]:
    """The three requests for ``data``, bodies encoded once, here."""
    as_json = {"Content-Type": "application/json"}
    binary, binary_headers = v2_binary_body(data)
    return {
        "/invocations": functools.partial(
            client.post, f"{url}/invocations", content=invocations_body(data), headers=as_json
        ),
        "V2 JSON": functools.partial(
            client.post, infer, content=v2_json_body(data), headers=as_json
        ),
        "V2 binary": functools.partial(client.post, infer, content=binary, headers=binary_headers),
    }


def check_same_predictions(requests: dict[str, Callable[[], httpx.Response]], size: int) -> None:
    expected = requests["/invocations"]().json()["predictions"]
    answer = requests["V2 JSON"]().json()
    got = answer["outputs"][0]["data"]
    if got != expected or len(got) != size:
        raise RuntimeError(f"V2 and /invocations disagree for {size} rows: {got} != {expected}")


# --------------------------------------------------------------------------- Modelcar


def modelcar_cost(
    registry: RegistryServer, host: str, path: str, digest: str, n: int
) -> dict[str, Any]:
    """The step after the smoke test timed in this process, as the pipeline runs it (a new
    registry client, the staged manifest in memory), with Modelcars on and off."""

    def factory(_host: str) -> RegistryClient:
        return RegistryClient(host, username=registry.username, password=registry.password)

    busybox = busybox_from(BUSYBOX)
    on = ImageCompanions(registry_factory=factory, modelcars=BusyboxModelcars(busybox))
    off = ImageCompanions(registry_factory=factory, modelcars=NoModelcars())
    target = ImageRef(f"{host}/{path}")
    with factory(host) as client:
        manifest = client.get_manifest(path, digest)
    timings: dict[str, list[float]] = {"on": [], "off": []}
    before = registry.stored_bytes()
    for i in range(n):
        for mode, companions in (("on", on), ("off", off))[:: 1 if i % 2 else -1]:
            request = SimpleNamespace(
                target=target,
                tag=f"bench{i}-{mode}",
                env={"MLFLOW_DOCK_V2_MODEL_NAME": MODEL_NAME},
                log=lambda _line: None,
            )
            start = time.perf_counter()
            companions.publish(request, manifest, speaks_v2=True)  # type: ignore[arg-type]
            timings[mode].append(time.perf_counter() - start)
    again = (registry.stored_bytes() - before) / n
    with factory(host) as client:
        other = f"{path}-busybox-{uuid.uuid4().hex[:6]}"
        start = time.perf_counter()
        client.upload_blob(other, busybox.data, busybox.layer.digest)
        busybox_upload = time.perf_counter() - start
    return {
        "on": timings["on"],
        "off": timings["off"],
        "again": again,
        "busybox_size": busybox.layer.size,
        "busybox_upload": busybox_upload,
    }


# --------------------------------------------------------------------------- setup


@contextlib.contextmanager
def container(client: docker.DockerClient, registry: RegistryServer, image: str) -> Any:
    client.images.pull(image, auth_config=registry.auth_config)
    port = free_port()
    running = client.containers.run(
        image, detach=True, network_mode="host", environment={"PORT": str(port)}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if web.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(running.logs().decode()[-2000:])
        yield url
    finally:
        running.remove(force=True)


# --------------------------------------------------------------------------- report


def ms(value: float) -> str:
    return f"{value:.2f} ms"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render(
    latency: dict[int, dict[str, list[float]]],
    sizes: dict[str, Any],
    car: dict[str, Any],
    *,
    machine: dict[str, str],
    notes: dict[str, str],
) -> str:
    out = [
        "# The Open Inference Protocol and Modelcars: latency and cost",
        "",
        f"Run {datetime.now(UTC).isoformat(timespec='seconds')}.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        "## Latency, same container, same rows",
        "",
        row(["rows", "request", "n", "p50", "p99", "p50 vs /invocations", "p99 vs /invocations"]),
        row(["---:", "---", "---:", "---:", "---:", "---:", "---:"]),
    ]
    verdicts = []
    for size, samples in latency.items():
        base50 = percentile(samples["/invocations"], 0.5)
        base99 = percentile(samples["/invocations"], 0.99)
        for name, values in samples.items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            rel50, rel99 = p50 / base50 - 1, p99 / base99 - 1
            out.append(
                row(
                    [
                        str(size),
                        name,
                        str(len(values)),
                        ms(p50),
                        ms(p99),
                        "" if name == "/invocations" else f"{rel50:+.1%}",
                        "" if name == "/invocations" else f"{rel99:+.1%}",
                    ]
                )
            )
            if name != "/invocations":
                verdicts.append((size, name, rel50, rel99))
    out += [
        "",
        f"Target: V2 adds at most {LATENCY_TARGET:.0%} (p50 and p99): "
        + "; ".join(
            f"{size} row{'s' if size > 1 else ''} {name}: "
            + ("met" if max(r50, r99) <= LATENCY_TARGET else "**missed**")
            for size, name, r50, r99 in verdicts
        )
        + ".",
        "",
        "## Size",
        "",
        f"- serving layer: {sizes['layer']:,} bytes compressed in the image (target at most "
        f"{LAYER_TARGET:,}: " + ("met" if sizes["layer"] <= LAYER_TARGET else "**missed**") + ")",
        f"- the same blob in every version and Modelcar of the run: {sizes['shared']}",
        "- registry growth per assembled version (blob bytes on disk, before/after its job): "
        + "; ".join(
            f"version {p['version']}: {p['growth']:,} bytes = image config and manifest "
            f"{p['image']:,} + new model layer {p['model']:,} + Modelcar config and manifest "
            f"{p['modelcar']:,} + SBOM and the rest {p['rest']:,}"
            for p in sizes["parts"]
        ),
        "",
        "## Modelcar",
        "",
        row(["step", "n", "median", "p90", "max"]),
        row(["---", "---:", "---:", "---:", "---:"]),
    ]
    added = [a - b for a, b in zip(car["on"], car["off"], strict=True)]
    for title, values in (
        ("V2 name only (Modelcars off: nothing read)", car["off"]),
        ("reading the image and writing its Modelcar (on)", car["on"]),
        ("added by the Modelcar (on - off, pairwise)", added),
    ):
        seconds = [v * 1000 for v in values]
        out.append(
            row(
                [
                    title,
                    str(len(values)),
                    ms(statistics.median(seconds)),
                    ms(percentile(seconds, 0.9)),
                    ms(max(seconds)),
                ]
            )
        )
    worst = max(added)
    per_version = max(p["modelcar"] for p in sizes["parts"])
    out += [
        "",
        f"- time added per version: median {statistics.median(added) * 1000:.1f} ms, max "
        f"{worst * 1000:.1f} ms (target at most {MODELCAR_TIME_TARGET * 1000:.0f} ms: "
        + ("met" if worst <= MODELCAR_TIME_TARGET else "**missed**")
        + ")",
        f"- registry growth per version's Modelcar: its config and manifest, at most "
        f"{per_version:,} bytes (distinct per version: "
        + ("yes" if sizes["distinct"] else "**no**")
        + "; busybox and model blobs shared; target at most "
        f"{MODELCAR_BYTES_TARGET:,}: "
        + ("met" if per_version <= MODELCAR_BYTES_TARGET else "**missed**")
        + f"); writing the same Modelcar again adds {car['again']:,.0f} bytes",
        f"- once per repository: the busybox blob, {car['busybox_size']:,} bytes, uploaded in "
        f"{car['busybox_upload'] * 1000:.0f} ms (mounted instead where another repository "
        "of the registry has it)",
        "",
        "## Notes",
        "",
        *(f"- {key}: {value}" for key, value in notes.items()),
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="requests per kind and size")
    parser.add_argument("--modelcar-n", type=int, default=30, help="Modelcar step samples")
    parser.add_argument("--wait-quiet", type=float, default=900.0, metavar="SECONDS")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, help="CPU busy share")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args()
    # A terminated run still stops its registry, MLflow server and service (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not BUSYBOX.is_file():
        parser.error(f"{BUSYBOX} missing: apt-get install busybox-static")

    client = docker.from_env(timeout=600)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-dock-v2-latency-"))

    def quiet() -> float:
        if args.wait_quiet <= 0:
            return cpu_busy(1.0)
        return wait_for_cpu(args.wait_quiet, args.quiet_threshold)

    try:
        machine = machine_info(client)
        print("setup: base image, registry, MLflow server...", flush=True)
        with webhook_stack(client, workdir, label="v2-latency") as stack:
            return measure(client, stack, args, machine, quiet)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def measure(
    client: docker.DockerClient,
    stack: Stack,
    args: argparse.Namespace,
    machine: dict[str, str],
    quiet: Callable[[], float],
) -> int:
    registry, mlflow_server, service = stack.registry, stack.mlflow_server, stack.service
    print("setup: versions 1 (native), 2 and 3 (assembled)...", flush=True)
    v1 = log_sklearn_model(mlflow_server.url, MODEL_NAME)
    builds = [wait_for_build(service, v1, timeout=1800)]
    growth = []
    for _ in range(2):
        before = registry.stored_bytes()
        version = register_model_version(
            mlflow_server.url, MODEL_NAME, from_model=MODEL_NAME, from_version=v1
        )
        builds.append(wait_for_build(service, version, timeout=600))
        growth.append(registry.stored_bytes() - before)
    host, _, rest = str(builds[0]["image"]).partition("/")
    path = rest.rpartition(":")[0]
    with RegistryClient(host, username=registry.username, password=registry.password) as reader:
        raw = [reader.get_manifest(path, b["digest"]).body for b in builds]
        manifests = [json.loads(body) for body in raw]
        config = json.loads(reader.get_blob(path, manifests[0]["config"]["digest"]))
        raw_cars = [reader.get_manifest(path, modelcar_tag(b["version"])).body for b in builds]
        cars = [json.loads(body) for body in raw_cars]
    history = [h for h in config["history"] if not h.get("empty_layer")]
    index = next(i for i, h in enumerate(history) if "COPY serving/" in h.get("created_by", ""))
    layer = manifests[0]["layers"][index]
    shared = all(m["layers"][index]["digest"] == layer["digest"] for m in manifests) and (
        len({c["layers"][0]["digest"] for c in cars}) == 1
    )
    # What each assembled version added, by part: its image's config and manifest, a model
    # layer unless the artifacts are the same (here they are), its Modelcar's config and
    # manifest; the rest is its SBOM (supply/attach.py).
    parts = []
    for number, manifest, body, car_doc, car_body, grown in zip(
        (b["version"] for b in builds[1:]),
        manifests[1:],
        raw[1:],
        cars[1:],
        raw_cars[1:],
        growth,
        strict=True,
    ):
        model = manifest["layers"][-1]
        new_model = model["digest"] != manifests[0]["layers"][-1]["digest"]
        image_bytes = manifest["config"]["size"] + len(body)
        car_bytes = car_doc["config"]["size"] + len(car_body)
        parts.append(
            {
                "version": number,
                "growth": grown,
                "image": image_bytes,
                "model": int(model["size"]) if new_model else 0,
                "modelcar": car_bytes,
                "rest": grown - image_bytes - (int(model["size"]) if new_model else 0) - car_bytes,
            }
        )
    distinct = len({c["config"]["digest"] for c in cars}) == len(cars)
    sizes = {
        "layer": int(layer["size"]),
        "shared": "yes" if shared else "**no**",
        "parts": parts,
        "distinct": distinct,
    }

    print("Modelcar step, in this process...", flush=True)
    quiet()
    car = modelcar_cost(registry, host, path, builds[2]["digest"], args.modelcar_n)

    print("latency: version 1's image, once...", flush=True)
    with container(client, registry, builds[0]["image"]) as url:
        busy = quiet()
        latency = measure_latency(url, MODEL_NAME, v1, args.n, (1, 100))
        busy_after = cpu_busy(1.0)

    notes = {
        "code": code_state(),
        "setup": "local CNCF Distribution (htpasswd) + `mlflow server` + `mlflow-dock "
        "serve` (native builder, smoke test off, Modelcars on), all on this machine",
        "model": f"{MODEL_NAME}: scikit-learn LogisticRegression on iris (4 FP64 columns); "
        "builds took " + ", ".join(f"{b['duration_seconds']:.1f} s" for b in builds),
        "latency": f"one httpx client on the host network, requests rotated per round, "
        f"{max(20, args.n // 10)} warm-up rounds; CPU {busy:.0%} busy before, "
        f"{busy_after:.0%} after (2 cores shared with other work)",
        "modelcar": f"{args.modelcar_n} pairs, order alternated; registry growth from blob "
        "bytes on disk before/after",
    }
    report = render(latency, sizes, car, machine=machine, notes=notes)
    print(report)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(report)
    print(f"written to {RESULT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
