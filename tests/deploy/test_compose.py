"""compose.yaml: parses, builds only from this repository or uses standard images, is wired
the way the README says (MLflow delivering webhooks, celery executor, PostgreSQL, Redis, an
engine-free worker; deploy/compose/engine.yaml adds the engine).

tests/integration/test_compose_stack.py runs the stack for real."""

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
ENGINE_OVERRIDE = ROOT / "deploy" / "compose" / "engine.yaml"
# Public images a user's machine pulls; everything else must be built from this repository.
STANDARD_IMAGES = {"postgres:16", "redis:7", "registry:2"}
REQUIRED_VARIABLES = {
    "MLFLOW_WEBHOOK_SECRET": "whsec-compose-test",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "3mSJXcCZbVvVbWsZKtd9rJkE2cbPPSsm1bcjlgA1f2E=",
    "POSTGRES_PASSWORD": "pg-compose-test",
}
PORT_VARIABLES = ("POSTGRES_PORT", "REDIS_PORT", "REGISTRY_PORT", "MLFLOW_PORT", "SERVE_PORT")


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


def test_no_service_mounts_the_docker_socket_and_the_worker_builds_natively(compose):
    for name, service in compose["services"].items():
        assert not any("docker.sock" in str(v) for v in service.get("volumes", [])), name
        assert "DOCKER_HOST" not in _env(service), name
    assert _env(compose["services"]["worker"])["MLFLOW_DOCK_BUILDER"] == "native"


def test_every_published_port_is_loopback_and_movable(compose):
    text = COMPOSE.read_text()
    for name in PORT_VARIABLES:
        assert f"${{{name}:-" in text, name
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:${"), (name, port)


def test_env_example_names_every_required_variable():
    example = (ROOT / "deploy" / "compose" / "env.example").read_text()
    text = COMPOSE.read_text()
    for name in REQUIRED_VARIABLES:
        assert f"${{{name}:?" in text
        assert f"\n{name}=" in example
    for name in PORT_VARIABLES:
        assert f"\n#{name}=" in example
    assert "${DOCKER_GID:?" in ENGINE_OVERRIDE.read_text()
    assert "\nDOCKER_GID=" in example


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


def test_engine_override_gives_only_the_worker_the_socket(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither docker-compose nor the compose plugin is installed (.ci/run installs it)"
        )
    env_file = tmp_path / "test.env"
    variables = {**REQUIRED_VARIABLES, "DOCKER_GID": "999"}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    env = {k: v for k, v in os.environ.items() if k not in variables}
    files = ["-f", str(COMPOSE), "-f", str(ENGINE_OVERRIDE)]
    result = subprocess.run(
        [*command, "--env-file", str(env_file), *files, "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    worker = services["worker"]
    assert [str(g) for g in worker["group_add"]] == ["999"]
    assert any("docker.sock" in str(v) for v in worker["volumes"])
    assert worker["environment"]["MLFLOW_DOCK_BUILDER"] == "native"
    for name, service in services.items():
        if name != "worker":
            assert not any("docker.sock" in str(v) for v in service.get("volumes", [])), name
