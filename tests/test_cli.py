from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DOCKER_"))}
    return subprocess.run(
        [sys.executable, "-m", "mlflow_dock", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_serve_without_settings_is_one_line_exit_2(tmp_path):
    result = run_cli("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mlflow-dock: error: MLFLOW_WEBHOOK_SECRET is required but not set"
    ]
    assert "Traceback" not in result.stderr


def test_invalid_setting_is_one_line_and_secret_free(tmp_path):
    env = {
        "MLFLOW_WEBHOOK_SECRET": "whsec-zzz",
        "DOCKER_USERNAME": "u",
        "DOCKER_REGISTRY_PASSWORD": "pw-zzz",
        "PORT": "not-a-port",
    }
    result = run_cli("serve", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "PORT" in result.stderr
    assert "whsec-zzz" not in result.stderr and "pw-zzz" not in result.stderr


@pytest.mark.parametrize("version", ["abc", "0", "1.5"])
def test_build_rejects_bad_version(tmp_path, version):
    env = {"MLFLOW_WEBHOOK_SECRET": "s", "DOCKER_USERNAME": "u", "DOCKER_REGISTRY_PASSWORD": "p"}
    result = run_cli("build", "m", version, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "VERSION must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_build_reports_unreachable_mlflow_in_one_line(tmp_path):
    env = {
        "MLFLOW_WEBHOOK_SECRET": "s",
        "DOCKER_USERNAME": "u",
        "DOCKER_REGISTRY_PASSWORD": "p",
        "DOCKER_REGISTRY": "127.0.0.1:5999",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_DOCK_DATA_DIR": str(tmp_path / "data"),
    }
    result = run_cli("build", "Some Model", "1", env=env, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow-dock: error: ")
    assert "Some Model" in lines[0]


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "build" in result.stdout


def test_parse_since():
    from datetime import UTC, datetime, timedelta

    from mlflow_dock.cli import parse_since

    now = datetime(2026, 11, 26, tzinfo=UTC)
    assert parse_since("7d", now=now) == now - timedelta(days=7)
    assert parse_since("90m", now=now) == now - timedelta(minutes=90)
    assert parse_since("2026-11-01", now=now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("last tuesday", now=now)


def test_backfill_bad_since_is_one_line(tmp_path):
    env = {"MLFLOW_WEBHOOK_SECRET": "s", "DOCKER_USERNAME": "u", "DOCKER_REGISTRY_PASSWORD": "p"}
    result = run_cli("backfill", "--since", "yesterday-ish", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mlflow-dock: error: --since: 'yesterday-ish' is neither an ISO date/time nor an age "
        "like 30m, 12h, 7d"
    ]


def test_worker_needs_the_celery_executor_and_a_broker(tmp_path):
    env = {"MLFLOW_WEBHOOK_SECRET": "whsec-zzz", "DOCKER_USERNAME": "u"}
    result = run_cli("worker", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mlflow-dock: error: MLFLOW_DOCK_EXECUTOR: set it to 'celery' to run separate workers"
    ]
    result = run_cli("worker", env={**env, "MLFLOW_DOCK_EXECUTOR": "celery"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "MLFLOW_DOCK_BROKER_URL" in result.stderr and "Traceback" not in result.stderr
