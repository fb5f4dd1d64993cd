"""uv for the target platform: platform names, errors, and reading back what was installed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mlflow_dock.errors import PermanentError
from mlflow_dock.imaging import wheels
from mlflow_dock.imaging.wheels import NoWheel, Platform, distributions, install
from support.disttree import fake_dist

PYSPARK_STDERR = """\
Using CPython 3.11.7 interpreter at: /usr/bin/python3
error: No solution found when resolving dependencies
  cause: Because pyspark==3.5.1 has no usable wheels and you require pyspark==3.5.1, we can \
conclude that your requirements are unsatisfiable.

hint: Wheels are required for `pyspark` because building from source is disabled for all \
packages (i.e., with `--no-build`)
"""


def test_platforms_map_to_manylinux_tags():
    assert Platform.parse("linux/amd64").python_platform((2, 36)) == "x86_64-manylinux_2_36"
    arm = Platform.parse("linux/arm64")
    assert arm.python_platform((2, 31)) == "aarch64-manylinux_2_31"
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    for bad in ("windows/amd64", "linux/s390x", "amd64"):
        with pytest.raises(ValueError):
            Platform.parse(bad)


def test_no_wheel_names_the_package():
    error = wheels._install_error(PYSPARK_STDERR, Platform.parse("linux/arm64"))
    assert isinstance(error, NoWheel)
    assert error.package == "pyspark"
    assert str(error) == "requirement 'pyspark' has no wheel for linux/arm64"


def test_other_uv_failures_are_permanent_with_uv_s_line():
    error = wheels._install_error(
        "error: Failed to parse: `numpy===`\n", Platform.parse("linux/amd64")
    )
    assert type(error) is PermanentError
    assert "Failed to parse" in str(error)


def test_uv_environment_carries_indexes_and_no_service_secrets(tmp_path: Path):
    env = wheels._uv_env(
        cache_dir=tmp_path,
        index_url="https://pypi.example/simple",
        extra_index_urls=("https://a/simple", "https://b/simple"),
        ca_bundle=tmp_path / "ca.crt",
        base={"PATH": "/bin", "DOCKER_REGISTRY_PASSWORD": "secret", "HTTPS_PROXY": "http://p"},
    )
    assert env["UV_INDEX_URL"] == "https://pypi.example/simple"
    assert env["UV_EXTRA_INDEX_URL"] == "https://a/simple https://b/simple"
    assert env["SSL_CERT_FILE"] == str(tmp_path / "ca.crt")
    assert env["HTTPS_PROXY"] == "http://p"
    assert "DOCKER_REGISTRY_PASSWORD" not in env


def test_index_credentials_reach_uv_through_its_environment_never_its_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any local process can read another's command line in /proc; only its owner (and root)
    # can read its environment.
    calls: list[tuple[list[str], dict[str, str]]] = []

    def run(command: list[str], *, env: dict[str, str], **_: object) -> subprocess.CompletedProcess:
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", run)
    wheels.install(
        "numpy\n",
        tmp_path / "target",
        platform=Platform.parse("linux/amd64"),
        python_version="3.11.7",
        glibc=(2, 36),
        cache_dir=tmp_path / "cache",
        index_url="https://user:tok3n@pypi.corp/simple",
        extra_index_urls=("https://x:s3cret@extra.corp/simple",),
        uv="/usr/bin/uv",
    )
    ((command, env),) = calls
    assert not any("tok3n" in arg or "s3cret" in arg for arg in command)
    assert "tok3n" in env["UV_INDEX_URL"] and "s3cret" in env["UV_EXTRA_INDEX_URL"]
    # Nothing of them stays on disk either (the requirements file is removed).
    assert not any("tok3n" in p.read_text() for p in tmp_path.rglob("*") if p.is_file())


def test_distributions_read_back_from_record(tmp_path: Path):
    fake_dist(tmp_path, "My_Pkg", "1.2", {"my_pkg/__init__.py": b""}, scripts={"mp": b"#!x\n"})
    fake_dist(tmp_path, "other", "0.1", {"other.py": b""})
    found = {d.name: d for d in distributions(tmp_path)}
    assert set(found) == {"my-pkg", "other"}
    mine = found["my-pkg"]
    assert mine.version == "1.2"
    assert "bin/mp" in mine.files and "my_pkg/__init__.py" in mine.files
    assert "other.py" not in mine.files


def test_find_uv_finds_an_executable():
    assert Path(wheels.find_uv()).name.startswith("uv")


def test_uv_installs_wheels_only_and_reads_no_configuration(tmp_path: Path):
    # A stand-in uv that records its command line: no model code may run on the worker.
    argv = tmp_path / "argv"
    fake = tmp_path / "uv"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv}\n')
    fake.chmod(0o755)
    install(
        "numpy==2.4.6\n",
        tmp_path / "site",
        platform=Platform.parse("linux/amd64"),
        python_version="3.11",
        glibc=(2, 36),
        cache_dir=tmp_path / "cache",
        uv=str(fake),
    )
    args = argv.read_text().splitlines()
    assert args[args.index("--only-binary") + 1] == ":all:"
    assert not any(arg.startswith(("--no-binary", "--find-links", "--index-url")) for arg in args)
