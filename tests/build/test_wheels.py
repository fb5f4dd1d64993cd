"""uv for the target platform: platform names, errors, and reading back what was installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_dock.build import wheels
from mlflow_dock.build.wheels import NoWheel, Platform, distributions
from mlflow_dock.errors import PermanentError
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
