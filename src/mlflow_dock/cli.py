"""Command line: `mlflow-dock serve` and `mlflow-dock build MODEL VERSION`.

Settings are read here, once; every failure the user can fix ends as one line on stderr.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, NoReturn

import typer

from mlflow_dock.errors import ConfigError, JobError, MlflowDockError
from mlflow_dock.settings import Settings, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn MLflow Model Registry events into serving images in a container registry.",
)


def _die(message: str, code: int) -> NoReturn:
    typer.echo(f"mlflow-dock: error: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        _die(str(exc), 2)


def _configure_logging(
    level: str, settings: Settings, redact: Callable[[str], str] | None = None
) -> None:
    """One redacting handler on the root logger, in MLFLOW_DOCK_LOG_FORMAT."""
    from mlflow_dock.jobs.logs import Redactor
    from mlflow_dock.observe.logformat import configure_logging

    configure_logging(
        level,
        settings.log_format,
        redact=redact or Redactor(settings.secret_values()),
        stream=sys.stderr,
    )


@app.command()
def serve() -> None:
    """Run the webhook receiver, job store and build workers."""
    import uvicorn

    from mlflow_dock.app import build_service, create_asgi_app

    settings = _settings()
    _configure_logging(settings.log_level, settings)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _die(f"MLFLOW_DOCK_DATA_DIR: cannot create {settings.data_dir}: {exc.strerror}", 2)
    ssl: dict[str, str] = {}
    if settings.tls_cert_file and settings.tls_key_file:
        ssl = {
            "ssl_certfile": str(settings.tls_cert_file),
            "ssl_keyfile": str(settings.tls_key_file),
        }
    try:
        # Built here rather than in the app's lifespan so a configuration problem found while
        # wiring (e.g. registry credentials) is one line on stderr, not a lifespan traceback.
        service = build_service(settings)
    except MlflowDockError as exc:
        _die(str(exc), 2)
    # Again with the service's redactor: it also learns the registry tokens fetched later.
    _configure_logging(settings.log_level, settings, service.components.redactor)
    try:
        uvicorn.run(
            create_asgi_app(settings, service=service),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            # Uvicorn's loggers propagate to our root handler: same format, same redaction.
            log_config=None,
            # A line per request is a measurable share of the intake's CPU at full rate;
            # rejected deliveries are logged by the intake, accepted ones are counted
            # (/metrics). MLFLOW_DOCK_LOG_LEVEL=debug brings the access log back.
            access_log=settings.log_level == "debug",
            **ssl,  # type: ignore[arg-type]
        )
    except MlflowDockError as exc:
        _die(str(exc), 1)


@app.command()
def worker() -> None:
    """Run build workers for MLFLOW_DOCK_EXECUTOR=celery (any number, on any machine)."""
    from mlflow_dock.app import create_celery_worker

    settings = _settings()
    _configure_logging(settings.log_level, settings)
    if settings.executor != "celery":
        _die("MLFLOW_DOCK_EXECUTOR: set it to 'celery' to run separate workers", 2)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        celery = create_celery_worker(settings)
    except OSError as exc:
        _die(f"MLFLOW_DOCK_DATA_DIR: cannot create {settings.data_dir}: {exc.strerror}", 2)
    except MlflowDockError as exc:
        _die(str(exc), 2)
    celery.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level.upper()}",
            f"--concurrency={max(1, settings.build_concurrency)}",
            # No gossip/mingle/heartbeat: workers coordinate through the job store, not Celery.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


@app.command()
def build(
    model: Annotated[str, typer.Argument(help="registered model name, as in MLflow")],
    version: Annotated[str, typer.Argument(help="model version number")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the build log")] = False,
) -> None:
    """Build and push one model version in the foreground (backfills, debugging)."""
    from mlflow_dock.app import Components
    from mlflow_dock.jobs.logs import redact

    settings = _settings()
    _configure_logging("warning" if not verbose else settings.log_level, settings)
    if not version.isdigit() or int(version) < 1:
        _die(f"VERSION must be a positive integer, got '{version}'", 2)
    secrets = settings.secret_values()

    def log(line: str) -> None:
        if verbose:
            typer.echo(redact(line, secrets), err=True)

    components = Components(settings)
    try:
        outcome = components.runner.build(model, str(int(version)), log)
    except JobError as exc:
        _die(redact(" ".join(str(exc).split()), secrets), 1)
    except MlflowDockError as exc:
        _die(redact(str(exc), secrets), 2)
    finally:
        components.close()
    typer.echo(f"{outcome.image}@{outcome.digest}")


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """An ISO date/time (UTC if no zone) or a relative age such as 30m, 12h, 7d."""
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - timedelta(seconds=int(match.group(1)) * unit)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since: '{value}' is neither an ISO date/time nor an age like 30m, 12h, 7d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command()
def backfill(
    model: Annotated[str | None, typer.Option("--model", help="only this registered model")] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="only versions created after: ISO date/time or 30m/12h/7d"),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="run the queued jobs here and wait (default: leave them to `serve`)",
        ),
    ] = False,
) -> None:
    """Queue builds (and alias tags) for model versions that have no image yet."""
    from mlflow_dock.app import Components
    from mlflow_dock.jobs.model import TERMINAL_STATES, JobState

    settings = _settings()
    _configure_logging("warning", settings)
    try:
        cutoff = parse_since(since) if since else None
    except ValueError as exc:
        _die(str(exc), 2)
    components = Components(settings)
    store = components.store
    try:
        queued = components.reconciler().run_once(model=model, since=cutoff)
    except MlflowDockError as exc:
        _die(" ".join(str(exc).split()), 1)
    typer.echo(f"queued {len(queued)} job(s)")
    for job in queued:
        label = f"alias '{job.alias}' -> " if job.alias else ""
        typer.echo(f"  {job.id}  {job.model_name}  {label}version {job.version}")
    if not wait or not queued:
        if queued:
            typer.echo("a running `mlflow-dock serve` using the same data directory builds them")
        return
    try:
        lanes = components.lanes()
    except MlflowDockError as exc:
        _die(str(exc), 2)
    # A service may run on the same store: leases keep its running jobs its own.
    lanes.start()
    ids = [job.id for job in queued]
    try:
        while not all(store.get(i).state in TERMINAL_STATES for i in ids):
            time.sleep(1)
    finally:
        lanes.stop()
        components.close()
    failed = 0
    for job in (store.get(i) for i in ids):
        if job.state is JobState.SUCCEEDED:
            typer.echo(f"ok      {job.model_name} {job.version}: {job.image}@{job.digest}")
        else:
            failed += 1
            typer.echo(f"failed  {job.model_name} {job.version}: {job.error}")
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="mlflow-dock")


if __name__ == "__main__":
    main()
