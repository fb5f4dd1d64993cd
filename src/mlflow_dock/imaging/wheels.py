"""Install a model's requirements for the *target* platform with uv, on the worker.

``uv pip install --target`` with ``--python-platform <arch>-manylinux_<glibc>`` and the image's
Python version installs the wheels an image of that platform needs, whatever the worker runs
(an x86 worker installs aarch64 wheels; nothing is executed). ``--only-binary :all:`` makes a
requirement without a wheel fail at once instead of compiling it for the worker's platform.
The manylinux tag must be the base image's glibc: a lower one silently picks older releases
(lightgbm 3.3.5 instead of 4.x with ``manylinux_2_17``).

The result is read back per distribution from each ``*.dist-info/RECORD``, which is what lets
:mod:`mlflow_dock.imaging.layers` give every installed package its own content-addressed layer.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from mlflow_dock.errors import PermanentError, RetryableError

__all__ = [
    "Distribution",
    "NoWheel",
    "Platform",
    "distributions",
    "find_uv",
    "install",
]

# OCI platform architecture -> the machine name in manylinux tags and ELF headers.
_MACHINE: Final = {"amd64": "x86_64", "arm64": "aarch64"}
_NO_WHEEL_RE: Final = re.compile(r"Wheels are required for `([^`]+)`|Because (\S+?)[=<>!~ ]")


@dataclass(frozen=True)
class Platform:
    """An OCI platform (``linux/amd64``) as the build needs it."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or parts[0] != "linux" or parts[1] not in _MACHINE:
            raise ValueError(f"unsupported platform {text!r}: expected linux/amd64 or linux/arm64")
        variant = parts[2] if len(parts) == 3 else None
        if parts[1] == "arm64" and variant not in (None, "v8"):
            raise ValueError(f"unsupported platform {text!r}")
        return cls(os=parts[0], architecture=parts[1], variant=variant)

    @property
    def machine(self) -> str:
        return _MACHINE[self.architecture]

    def python_platform(self, glibc: tuple[int, int]) -> str:
        return f"{self.machine}-manylinux_{glibc[0]}_{glibc[1]}"

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


class NoWheel(PermanentError):
    """uv found no wheel for ``package`` on the target: only an engine build can help."""

    def __init__(self, message: str, *, package: str | None) -> None:
        super().__init__(message)
        self.package = package


@dataclass(frozen=True)
class Distribution:
    """One installed distribution: its files as RECORD lists them, relative to the target."""

    name: str  # normalised project name
    version: str
    dist_info: str  # "<name>-<version>.dist-info"
    files: tuple[str, ...]  # POSIX paths relative to the install target, sorted
    record: bytes  # the RECORD file's bytes: hashes of every file, hence the layer's identity


def find_uv() -> str:
    """The uv executable: the ``uv`` Python package's binary if installed, else uv on PATH."""
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found is None:
        raise PermanentError(
            "the native builder needs uv (pip install uv, or put uv on PATH); "
            "or set MLFLOW_DOCK_BUILDER=layered to build with a Docker Engine"
        )
    return found


def install(
    requirements: str,
    target_dir: Path,
    *,
    platform: Platform,
    python_version: str,
    glibc: tuple[int, int],
    cache_dir: Path,
    index_url: str | None = None,
    extra_index_urls: tuple[str, ...] = (),
    ca_bundle: Path | None = None,
    timeout: float = 1800,
    uv: str | None = None,
) -> list[Distribution]:
    """Install ``requirements`` (requirements.txt text) into ``target_dir`` for the target.

    Raises :class:`NoWheel` when a requirement has no wheel for the target platform.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    requirements_file = target_dir.parent / f"{target_dir.name}.requirements.txt"
    requirements_file.write_text(requirements)
    major_minor = ".".join(python_version.split(".")[:2])
    command = [
        uv or find_uv(),
        "pip",
        "install",
        "--quiet",
        "--target",
        str(target_dir),
        "--python-platform",
        platform.python_platform(glibc),
        "--python-version",
        major_minor,
        "--only-binary",
        ":all:",
        "--no-progress",
        "-r",
        str(requirements_file),
    ]
    env = _uv_env(
        cache_dir=cache_dir,
        index_url=index_url,
        extra_index_urls=extra_index_urls,
        ca_bundle=ca_bundle,
        base=os.environ,
    )
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RetryableError(
            f"uv did not finish installing requirements in {timeout:.0f}s"
        ) from exc
    finally:
        requirements_file.unlink(missing_ok=True)
    if result.returncode != 0:
        raise _install_error(result.stderr, platform)
    return distributions(target_dir)


def _uv_env(
    *,
    cache_dir: Path,
    index_url: str | None,
    extra_index_urls: tuple[str, ...],
    ca_bundle: Path | None,
    base: Mapping[str, str],
) -> dict[str, str]:
    # Only what uv needs from the service's environment: no registry or webhook secrets.
    keep = ("PATH", "HOME", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy")
    env = {key: base[key] for key in keep if key in base}
    env.update(
        UV_CACHE_DIR=str(cache_dir),
        UV_PYTHON_DOWNLOADS="never",
        UV_NO_CONFIG="1",
        # The worker's system CA store, as pip on the worker would use.
        UV_NATIVE_TLS="1",
    )
    if index_url:
        env["UV_INDEX_URL"] = index_url
    if extra_index_urls:
        env["UV_EXTRA_INDEX_URL"] = " ".join(extra_index_urls)
    if ca_bundle is not None:
        env["SSL_CERT_FILE"] = str(ca_bundle)
    return env


def _install_error(stderr: str, platform: Platform) -> PermanentError:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # uv reports no structured error; the wording only names the package, while the
    # decision (engine fallback) rests on uv having failed under --only-binary at all.
    if "no usable wheels" in stderr or "Wheels are required for" in stderr:
        match = _NO_WHEEL_RE.search(stderr)
        package = (match.group(1) or match.group(2)) if match else None
        return NoWheel(f"requirement '{package}' has no wheel for {platform}", package=package)
    detail = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")
    cause = next((line for line in lines if line.startswith("cause:")), "")
    return PermanentError(f"uv could not install the requirements: {detail} {cause}".strip())


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(target_dir: Path) -> list[Distribution]:
    """Every ``*.dist-info`` under ``target_dir`` with the files its RECORD lists."""
    found: list[Distribution] = []
    for info in sorted(target_dir.glob("*.dist-info")):
        record_path = info / "RECORD"
        metadata = info / "METADATA"
        if not record_path.is_file() or not metadata.is_file():
            continue
        record = record_path.read_bytes()
        name = version = None
        with metadata.open(encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("Name:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
                elif not line.strip():
                    break
        if name is None or version is None:
            continue
        files: set[str] = set()
        for row in csv.reader(io.StringIO(record.decode("utf-8", "replace"))):
            if not row or not row[0]:
                continue
            path = PurePosixPath(row[0])
            if path.is_absolute() or ".." in path.parts:
                continue
            if (target_dir / path).exists() or (target_dir / path).is_symlink():
                files.add(str(path))
        files.add(f"{info.name}/RECORD")
        found.append(
            Distribution(
                name=_normalise(name),
                version=version,
                dist_info=info.name,
                files=tuple(sorted(files)),
                record=record,
            )
        )
    return found
