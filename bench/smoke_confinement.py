"""What confining model code costs a runtime's first (full) smoke test.

Usage (repository root, as root, Docker Engine running)::

    .venv/bin/python bench/smoke_confinement.py [--n 10] [--wait-quiet SECONDS]

One scikit-learn version is built through the real service (native builder, smoke test off),
then its image is smoke-tested ``--n`` times each way, alternating, on the same engine:

- **unconfined**, as the full smoke test ran before confinement (``git show
  d408a17:src/mlflow_dock/build/smoke.py``): ``docker run`` on the host network with ``$PORT``,
  ``/ping`` polled from the host every 0.5 s, the input example posted from the host;
- **confined**, the service's own :class:`~mlflow_dock.imaging.smoke.SmokeTester`: no network,
  memory/CPU/pids limits, read-only root, every capability dropped, user 10001, and the probe
  run inside the container through the engine's ``exec``.

Each time is from the container's creation to the example's answer and the container's
removal. The target (issue 16): confined at most 10 % longer than unconfined.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (REPO_ROOT / "src", REPO_ROOT / "bench", REPO_ROOT / "tests"):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import docker  # noqa: E402
import httpx  # noqa: E402
from alias_latency import wait_for_cpu  # noqa: E402
from build_speed import code_state, cpu_busy  # noqa: E402
from stack import webhook_stack  # noqa: E402
from v2_latency import MODEL_NAME, wait_for_build  # noqa: E402

from mlflow_dock.imaging.engine import DockerEngine  # noqa: E402
from mlflow_dock.imaging.smoke import SmokeLimits, SmokeTester  # noqa: E402
from support import web  # noqa: E402
from support.servers import (  # noqa: E402
    free_port,
    log_sklearn_model,
)

EXAMPLE = "/opt/ml/model/serving_input_example.json"
TARGET = 0.10


def unconfined(client: docker.DockerClient, image: str, example: bytes) -> float:
    """The pre-confinement full smoke test, step for step."""
    started = time.monotonic()
    port = free_port()
    container = client.containers.run(
        image,
        name=f"bench-unconfined-{uuid.uuid4().hex[:8]}",
        detach=True,
        network_mode="host",
        environment={"PORT": str(port)},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            container.reload()
            if container.status in ("exited", "dead"):
                raise RuntimeError(container.logs().decode()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if web.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("no answer on /ping")
            time.sleep(0.5)
        answer = web.post(
            f"{url}/invocations",
            content=example,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        if answer.status_code != 200:
            raise RuntimeError(answer.text)
    finally:
        container.remove(force=True)
    return time.monotonic() - started


def file_in_image(client: docker.DockerClient, image: str, path: str) -> bytes:
    """One file of ``image``, read from a container that is created but never started (the
    log of a short-lived container that printed it can come back cut short)."""
    container = client.containers.create(image)
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            member = archive.extractfile(archive.getmembers()[0])
            assert member is not None
            return member.read()
    finally:
        container.remove(force=True)


def confined(tester: SmokeTester, image: str, example: Path) -> float:
    started = time.monotonic()
    tester.check(image, example, lambda _line: None)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="smoke tests each way")
    parser.add_argument("--wait-quiet", type=float, default=600.0, metavar="SECONDS")
    parser.add_argument(
        "--cpus", type=float, default=None, help="the confined side's CPU limit (default: 1)"
    )
    parser.add_argument("--quiet-threshold", type=float, default=0.25, help="CPU busy share")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    client = docker.from_env(timeout=600)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-dock-smoke-bench-"))
    try:
        print("setup: registry, MLflow server, service, one native build...", flush=True)
        with webhook_stack(client, workdir, label="smoke", MLFLOW_DOCK_MODELCAR="false") as stack:
            version = log_sklearn_model(stack.mlflow_server.url, MODEL_NAME)
            image = str(wait_for_build(stack.service, version, timeout=1800)["image"])
            client.images.pull(image, auth_config=stack.registry.auth_config)
        example = workdir / "serving_input_example.json"
        example.write_bytes(file_in_image(client, image, EXAMPLE))
        return measure(client, image, example, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(
    client: docker.DockerClient, image: str, example: Path, args: argparse.Namespace
) -> int:
    """The image stays in the engine once the stack is gone: only the engine is measured."""
    example_bytes = example.read_bytes()
    limits = SmokeLimits() if args.cpus is None else SmokeLimits(cpus=args.cpus)
    tester = SmokeTester(DockerEngine(), limits=limits)
    unconfined(client, image, example_bytes)  # warm-up: page cache, engine
    confined(tester, image, example)
    busy = (
        cpu_busy(1.0)
        if args.wait_quiet <= 0
        else wait_for_cpu(args.wait_quiet, args.quiet_threshold)
    )
    times: dict[str, list[float]] = {"unconfined": [], "confined": []}
    for round_ in range(args.n):
        order = ("unconfined", "confined") if round_ % 2 == 0 else ("confined", "unconfined")
        for side in order:
            if side == "unconfined":
                times[side].append(unconfined(client, image, example_bytes))
            else:
                times[side].append(confined(tester, image, example))
        print(
            f"round {round_ + 1}: unconfined {times['unconfined'][-1]:.2f} s,"
            f" confined {times['confined'][-1]:.2f} s",
            flush=True,
        )
    after = cpu_busy(1.0)
    print(f"\ncode: {code_state()}; CPU busy before {busy:.0%}, after {after:.0%}")
    print(f"image: {image}, n={args.n} each, alternating; confined to {limits.cpus:g} CPU(s)\n")
    print("| smoke test | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for side, values in times.items():
        print(
            f"| {side} | {statistics.median(values):.2f} s | {min(values):.2f} s"
            f" | {max(values):.2f} s |"
        )
    ratio = statistics.median(times["confined"]) / statistics.median(times["unconfined"]) - 1
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"\nconfined vs unconfined (medians): {ratio:+.1%} (target at most +10 %: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
