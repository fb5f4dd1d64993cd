"""Command line: `mlflow-dock serve` and `mlflow-dock build MODEL VERSION`.

Settings are read here, once; every failure the user can fix ends as one line on stderr.
"""

from __future__ import annotations

import logging
import sys
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


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def serve() -> None:
    """Run the webhook receiver, job store and build workers."""
    import uvicorn

    from mlflow_dock.api import create_app

    settings = _settings()
    _configure_logging(settings.log_level)
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
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            **ssl,  # type: ignore[arg-type]
        )
    except MlflowDockError as exc:
        _die(str(exc), 1)


@app.command()
def build(
    model: Annotated[str, typer.Argument(help="registered model name, as in MLflow")],
    version: Annotated[str, typer.Argument(help="model version number")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the build log")] = False,
) -> None:
    """Build and push one model version in the foreground (backfills, debugging)."""
    from mlflow_dock.buildlogs import redact
    from mlflow_dock.engine import DockerEngine
    from mlflow_dock.service import make_runner
    from mlflow_dock.store import JobStore

    settings = _settings()
    _configure_logging("warning" if not verbose else settings.log_level)
    if not version.isdigit() or int(version) < 1:
        _die(f"VERSION must be a positive integer, got '{version}'", 2)
    secrets = settings.secret_values()

    def log(line: str) -> None:
        if verbose:
            typer.echo(redact(line, secrets), err=True)

    engine = DockerEngine(base_url=settings.docker_host, network_mode=settings.build_network)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore.from_url(settings.resolved_database_url)
        runner = make_runner(settings, store, engine)
        outcome = runner.build(model, str(int(version)), log)
    except JobError as exc:
        _die(redact(" ".join(str(exc).split()), secrets), 1)
    except MlflowDockError as exc:
        _die(redact(str(exc), secrets), 2)
    finally:
        engine.close()
    typer.echo(f"{outcome.image}@{outcome.digest}")


def main() -> None:
    app(prog_name="mlflow-dock")


if __name__ == "__main__":
    main()
