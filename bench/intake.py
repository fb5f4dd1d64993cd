"""Webhook intake throughput: `mlflow-dock serve` beside a bare FastAPI + HMAC receiver.

Usage (from the repository root; needs `wrk`, Debian package `wrk`)::

    .venv/bin/python bench/intake.py [--duration 10] [--connections 50] [--requests 100000]

Both receivers run in the same run on this machine, each as one uvicorn process on 127.0.0.1:

* mlflow-dock: the real `mlflow-dock serve` (SQLite store in a temporary directory, smoke test,
  reconciliation and MLflow write-back off, `MLFLOW_DOCK_BUILD_CONCURRENCY=0` and
  `MLFLOW_DOCK_ALIAS_CONCURRENCY=0`: this process only accepts). Every 202 means the delivery
  is committed to the store.
* bare: FastAPI with the same `WebhookVerifier` HMAC check and a constant 202, nothing stored,
  run with the server settings of `serve` (uvicorn's auto loop and parser, no access log).

`wrk` (1 thread, 50 connections by default, as in issue 9) replays precomputed, individually
signed MLflow deliveries from a file: every delivery id is sent at most once (nine in ten are
`model_version.created` for a new version, one in ten `model_version_alias.created` for a
version created earlier). Afterwards the store is read back: every job id answered with a 202 must
be there with its delivery recorded ("nothing lost"). Bare and mlflow-dock alternate for
`--rounds` rounds (other load on a shared machine varies); prints req/s, p50/p99 and the ratio
per round, and writes them to `bench/results/intake.md`. `--profile FILE` (and
`--profile-bare FILE`, `--profile-gil`) records the first round with py-spy.
`--build-concurrency 1` measures a version that cannot run accept-only (before
MLFLOW_DOCK_BUILD_CONCURRENCY=0 existed); `--alias-concurrency 1` an API replica as deployed by
default, with its alias lane (every alias delivery wakes it; here it finds the alias waiting
for its version's build, which no process runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _entry in (REPO_ROOT / "src", REPO_ROOT):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from mlflow_dock.errors import RequestError  # noqa: E402
from mlflow_dock.intake.signatures import WebhookVerifier, sign  # noqa: E402

HOST = "127.0.0.1"  # every request of this benchmark stays on this machine

# wrk calls `request()` for every request; it cycles through the prepared deliveries (a warning
# is printed if it had to wrap around) and `done()` writes the job ids of the 202 answers.
_LUA = r"""
local lines = {}
local index = 0
wrapped = 0
ids = {}
statuses = {}

function init(args)
  for line in io.lines(args[1]) do
    local id, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    lines[#lines + 1] = wrk.format("POST", "/webhook", {
      ["Content-Type"] = "application/json",
      ["X-MLflow-Delivery-Id"] = id,
      ["X-MLflow-Timestamp"] = ts,
      ["X-MLflow-Signature"] = sig,
    }, body)
  end
end

function request()
  index = index + 1
  if index > #lines then
    index = 1
    wrapped = wrapped + 1
  end
  return lines[index]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 202 then
    local job = body:match('"job_id":"([^"]+)"')
    if job then ids[#ids + 1] = job end
  end
end

local threads = {}
function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, requests)
  local out = io.open(os.getenv("BENCH_IDS_FILE"), "w")
  local counts = {}
  local wraps = 0
  for _, t in ipairs(threads) do
    for _, id in ipairs(t:get("ids")) do out:write(id, "\n") end
    for status, n in pairs(t:get("statuses")) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + n
    end
    wraps = wraps + t:get("wrapped")
  end
  out:close()
  local parts = {}
  for status, n in pairs(counts) do parts[#parts + 1] = string.format('"%s": %d', status, n) end
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"connect_errors": %d, "read_errors": %d, "timeouts": %d, "wrapped": %d, '
    .. '"statuses": {%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.connect, summary.errors.read, summary.errors.timeout, wraps,
    table.concat(parts, ", ")))
end
"""


@dataclass(frozen=True)
class Result:
    name: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    errors: int
    wrapped: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def write_deliveries(path: Path, secret: str, count: int, *, model: str) -> None:
    """`count` signed MLflow deliveries, one per line: id, timestamp, signature, raw body."""
    timestamp = str(int(time.time()))
    with path.open("w") as out:
        for i in range(count):
            if i % 10 == 9:
                payload = {
                    "entity": "model_version_alias",
                    "action": "created",
                    "timestamp": "2026-11-27T04:00:00.000000+00:00",
                    "data": {"name": model, "alias": f"a{i % 7}", "version": str(i)},
                }
            else:
                payload = {
                    "entity": "model_version",
                    "action": "created",
                    "timestamp": "2026-11-27T04:00:00.000000+00:00",
                    "data": {
                        "name": model,
                        "version": str(i + 1),
                        "source": f"models:/m-{uuid.uuid4().hex}",
                        "run_id": None,
                        "tags": {},
                        "description": None,
                    },
                }
            # MLflow's own serialisation: json.dumps with default separators.
            body = json.dumps(payload)
            delivery = str(uuid.uuid4())
            signature = sign(secret, delivery, timestamp, body.encode())
            out.write(f"{delivery}\t{timestamp}\t{signature}\t{body}\n")


def run_wrk(
    name: str, port: int, script: Path, deliveries: Path, ids_file: Path, args: argparse.Namespace
) -> Result:
    cmd = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://{HOST}:{port}/webhook",
        "--",
        str(deliveries),
    ]
    env = {**os.environ, "BENCH_IDS_FILE": str(ids_file)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH "))
    data = json.loads(line.removeprefix("BENCH "))
    return Result(
        name=name,
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        statuses=data["statuses"],
        errors=data["connect_errors"] + data["read_errors"] + data["timeouts"],
        wrapped=data["wrapped"],
    )


def bare_receiver(port: int, secret: str) -> None:
    """The yardstick: FastAPI, the same HMAC verification, no storage."""
    verifier = WebhookVerifier([secret])
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            verifier.verify(body, request.headers)
        except RequestError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=401)
        return JSONResponse({"accepted": True}, status_code=202)

    # The server settings of `mlflow-dock serve`: log level info, no access log, and uvicorn's
    # "auto" loop and HTTP parser (uvloop and httptools when installed, as they are here).
    uvicorn.run(
        app, host=HOST, port=port, log_level="info", access_log=False, loop="auto", http="auto"
    )


def server_stack() -> str:
    """What uvicorn's "auto" picks in this environment, for both receivers alike."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__} ({loop}, {http})"


def _profiler(
    args: argparse.Namespace, out: str | None, pid: int
) -> subprocess.Popen[bytes] | None:
    if not out:
        return None
    cmd = ["py-spy", "record", "-p", str(pid), "-o", out, "-f", "raw", "--rate", "250"]
    return subprocess.Popen(
        [*cmd, "--gil"] if args.profile_gil else cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(2)
        profiler.wait(30)


def verify_store(db: Path, ids_files: list[Path], sent_ids: set[str]) -> tuple[int, int, int]:
    """(202 answers, of them found with a recorded delivery, deliveries never sent)."""
    answered = [x for f in ids_files for x in f.read_text().splitlines() if x]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT delivery_id, job_id FROM deliveries").fetchall()
    by_job: dict[str, list[str]] = {}
    for delivery, job in rows:
        by_job.setdefault(job, []).append(delivery)
    found = sum(1 for job in answered if by_job.get(job))
    unknown = sum(1 for delivery, _ in rows if delivery not in sent_ids)
    return len(answered), found, unknown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--requests", type=int, default=100_000, help="prepared deliveries per round"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="bare and mlflow-dock alternate this many times (other load on the machine varies)",
    )
    parser.add_argument(
        "--build-concurrency", default="0", help="MLFLOW_DOCK_BUILD_CONCURRENCY for the service"
    )
    parser.add_argument(
        "--alias-concurrency", default="0", help="MLFLOW_DOCK_ALIAS_CONCURRENCY for the service"
    )
    parser.add_argument(
        "--write-back",
        action="store_true",
        help="MLflow write-back on (tags recorded in the store; MLflow itself is unreachable)",
    )
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument(
        "--profile", metavar="FILE", help="record the service with py-spy (must be on PATH)"
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (py-spy --gil)",
    )
    parser.add_argument(
        "--profile-bare", metavar="FILE", help="record the bare receiver with py-spy as well"
    )
    parser.add_argument("--bare-receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_receiver:
        bare_receiver(args.bare_receiver, args.secret)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="mlflow-dock-intake-"))
    secret = secrets.token_urlsafe(24)
    script = work / "deliveries.lua"
    script.write_text(_LUA)
    rounds = [work / f"deliveries-{i}.tsv" for i in range(args.rounds)]
    for i, path in enumerate(rounds):
        write_deliveries(path, secret, args.requests, model=f"Intake Bench {i}")
    warmup = work / "warmup.tsv"
    write_deliveries(warmup, secret, 2000, model="Intake Warmup")
    sent_ids = {
        line.split("\t", 1)[0]
        for path in (*rounds, warmup)
        for line in path.read_text().splitlines()
    }

    dock_port, bare_port = _free_port(), _free_port()
    data_dir = work / "data"
    env = {
        **os.environ,
        "MLFLOW_WEBHOOK_SECRET": secret,
        "DOCKER_USERNAME": "bench",
        "DOCKER_REGISTRY_PASSWORD": "bench",
        # Never contacted: this process runs no builds.
        "DOCKER_REGISTRY": "127.0.0.1:9",
        "DOCKER_HOST": "unix:///nonexistent/docker.sock",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
        "MLFLOW_DOCK_HOST": HOST,
        "PORT": str(dock_port),
        "MLFLOW_DOCK_DATA_DIR": str(data_dir),
        "MLFLOW_DOCK_BUILD_CONCURRENCY": args.build_concurrency,
        "MLFLOW_DOCK_ALIAS_CONCURRENCY": args.alias_concurrency,
        "MLFLOW_DOCK_SMOKE_TEST": "false",
        "MLFLOW_DOCK_RECONCILE_INTERVAL": "0",
        "MLFLOW_DOCK_MLFLOW_WRITE_BACK": "true" if args.write_back else "false",
    }
    env.pop("MLFLOW_DOCK_DATABASE_URL", None)
    env.pop("MLFLOW_DOCK_API_TOKEN", None)
    exe = Path(sys.executable).with_name("mlflow-dock")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (work / "dock.log").open("wb") as dock_log, (work / "bare.log").open("wb") as bare_log:
            dock = subprocess.Popen([str(exe), "serve"], env=env, stdout=dock_log, stderr=dock_log)
            procs.append(dock)
            bare = subprocess.Popen(
                [sys.executable, __file__, "--bare-receiver", str(bare_port), f"--secret={secret}"],
                stdout=bare_log,
                stderr=bare_log,
            )
            procs.append(bare)
            _wait_http(f"http://{HOST}:{dock_port}/health", dock)
            _wait_http(f"http://{HOST}:{bare_port}/health", bare)

            warm_args = argparse.Namespace(**{**vars(args), "duration": 2})
            for name, port in (("bare", bare_port), ("mlflow-dock", dock_port)):
                run_wrk(name, port, script, warmup, work / "warm-ids.txt", warm_args)
            results: list[tuple[Result, Result, float]] = []
            dock_ids: list[Path] = []
            for i, deliveries in enumerate(rounds):
                profile_bare = _profiler(args, args.profile_bare, bare.pid) if i == 0 else None
                bare_r = run_wrk("bare", bare_port, script, deliveries, work / "bare-ids.txt", args)
                _stop_profiler(profile_bare)
                profiler = _profiler(args, args.profile, dock.pid) if i == 0 else None
                dock_ids.append(work / f"dock-ids-{i}.txt")
                dock_r = run_wrk("mlflow-dock", dock_port, script, deliveries, dock_ids[-1], args)
                _stop_profiler(profiler)
                results.append((bare_r, dock_r, os.getloadavg()[0]))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    answered, found, unknown = verify_store(data_dir / "jobs.db", dock_ids, sent_ids)
    lines = [
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, unique signed deliveries, "
        f"one {server_stack()} process each, {os.cpu_count()} CPUs; "
        "rounds alternate bare and mlflow-dock",
        "",
        "| round | receiver | requests | req/s | p50 | p99 | max | statuses | socket errors "
        "| ratio | load avg |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for i, (bare_r, dock_r, load) in enumerate(results, 1):
        for r in (bare_r, dock_r):
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
            ratio = f"{dock_r.rate / bare_r.rate:.2f}" if r is dock_r else ""
            lines.append(
                f"| {i} | {r.name} | {r.requests} | {r.rate:,.0f} | {r.p50_ms:.1f} ms "
                f"| {r.p99_ms:.1f} ms | {r.max_ms:.1f} ms | {statuses} | {r.errors} | {ratio} "
                f"| {load:.1f} |"
            )
            if r.wrapped:
                lines.append(f"WARNING: {r.name} reused deliveries; raise --requests")
    ratios = sorted(d.rate / b.rate for b, d, _ in results)
    lines += [
        "",
        f"mlflow-dock / bare (median of {len(ratios)} rounds): {ratios[len(ratios) // 2]:.2f}",
        f"nothing lost: {found} of {answered} deliveries answered 202 are in the store"
        f" ({'OK' if found == answered else 'LOST ' + str(answered - found)}); "
        f"{unknown} stored deliveries were never sent",
    ]
    report = "\n".join(lines)
    print(report)
    out = REPO_ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "intake.md").write_text(report + "\n")
    if args.keep_workdir:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if found == answered and unknown == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
