"""compose.yaml: parses, builds only from this repository or uses standard images, is wired
the way the README says (MLflow delivering webhooks, celery executor, PostgreSQL, Redis)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlflow_dock.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
# Public images a user's machine pulls; everything else must be built from this repository.
STANDARD_IMAGES = {"postgres:16", "redis:7", "registry:2"}
REQUIRED_VARIABLES = {
    "MLFLOW_WEBHOOK_SECRET": "whsec-compose-test",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "3mSJXcCZbVvVbWsZKtd9rJkE2cbPPSsm1bcjlgA1f2E=",
    "POSTGRES_PASSWORD": "pg-compose-test",
    "DOCKER_GID": "999",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, so anchors merge"
    return {k: str(v) for k, v in env.items()}


def _settings_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if alias is not None:
            names.update(c for c in alias.choices if isinstance(c, str))  # type: ignore[union-attr]
    return names


def test_images_are_built_here_or_standard(compose):
    services = compose["services"]
    built = {s["image"] for s in services.values() if "build" in s}
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: every service names its image"
        if "build" in service:
            build = service["build"]
            context = ROOT / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (context / dockerfile).is_file(), f"{name}: {context / dockerfile}"
        else:
            assert image in STANDARD_IMAGES | built, f"{name}: unexpected image {image}"


def test_mlflow_delivers_webhooks_from_a_sql_backend(compose):
    mlflow = compose["services"]["mlflow"]
    env = _env(mlflow)
    assert env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https"
    assert env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    # Required from .env (compose stops with the message), never a literal key in the file.
    assert env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"].startswith(
        "${MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY:?"
    )
    backend = next(a for a in mlflow["command"] if a.startswith("--backend-store-uri="))
    assert backend.split("=", 1)[1].startswith("postgresql+psycopg://")
    initdb = next(v for v in compose["services"]["postgres"]["volumes"] if "initdb" in v)
    assert (ROOT / initdb.split(":")[0]).is_file()


def test_serve_and_worker_use_celery_postgres_and_redis(compose):
    known = _settings_names()
    for name in ("serve", "worker"):
        service = compose["services"][name]
        env = _env(service)
        assert service["image"] == "mlflow-dock:local"
        assert service["command"] == [name]
        assert env["MLFLOW_DOCK_EXECUTOR"] == "celery"
        assert env["MLFLOW_DOCK_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["MLFLOW_DOCK_BROKER_URL"].startswith("redis://")
        assert env["MLFLOW_WEBHOOK_SECRET"].startswith("${MLFLOW_WEBHOOK_SECRET:?")
        # A misspelt variable would be silently ignored by the service.
        assert set(env) <= known, set(env) - known
    serve = compose["services"]["serve"]
    assert any("/ready" in part for part in serve["healthcheck"]["test"])
    assert "/var/run/docker.sock:/var/run/docker.sock" not in serve.get("volumes", [])


def test_env_example_names_every_required_variable():
    example = (ROOT / "deploy" / "compose" / "env.example").read_text()
    text = COMPOSE.read_text()
    for name in REQUIRED_VARIABLES:
        assert f"${{{name}:?" in text
        assert f"\n{name}=" in example


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_validates(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither docker-compose nor the compose plugin is installed (.ci/run installs it)"
        )
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in REQUIRED_VARIABLES.items()))
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED_VARIABLES}
    result = subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == {
        "postgres",
        "redis",
        "registry",
        "mlflow",
        "serve",
        "worker",
    }
    worker_env = rendered["services"]["worker"]["environment"]
    assert worker_env["MLFLOW_WEBHOOK_SECRET"] == REQUIRED_VARIABLES["MLFLOW_WEBHOOK_SECRET"]
    # A missing secret stops compose with the hint from compose.yaml.
    env_file.write_text(
        "POSTGRES_PASSWORD=x\nDOCKER_GID=1\nMLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=k\n"
    )
    missing = subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert missing.returncode != 0
    assert "MLFLOW_WEBHOOK_SECRET" in missing.stderr
