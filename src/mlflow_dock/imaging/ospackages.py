"""OS packages for the native builder: a derived base image with a few Debian packages.

When the only thing a natively built image lacks is a shared library the base image does not
have (lightgbm's ``libgomp.so.1`` on a slim base), the engine is used for that one step only:
``FROM <base>@<digest>`` + ``apt-get install --no-install-recommends <packages>``, pushed to the
target registry as a *derived base* named by what it is made of
(``<namespace>/mlflow-dock-base:os-<hash of base digest + packages>``), reused by every later build
that needs the same packages on the same base, and the native builder continues on top of it.
The rest of the image (wheels, model) is still assembled without an engine.

Why the engine and not an engine-free ``.deb`` unpacker: measured on the CI machine, the apt
step costs ~3 s, which keeps the lightgbm case well inside its target, and apt verifies the
archive's signatures and runs the packages' scripts as Debian intends; doing that by hand
(InRelease signature, Depends resolution, ``dpkg`` status) would be a second package manager.

The soname -> package table is deliberately small and exact: an unknown soname keeps the full
engine fallback (or the one-line error), it is never guessed.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "DERIVED_REPOSITORY",
    "SONAME_PACKAGES",
    "derived_tag",
    "lacking",
    "packages_for",
    "render_derived_dockerfile",
]

# The derived bases' repository under the target namespace.
DERIVED_REPOSITORY: Final = "mlflow-dock-base"
_FORMAT: Final = "1"

# Debian (bookworm and later keep these names) packages that provide a soname.
SONAME_PACKAGES: Final[Mapping[str, str]] = {
    "libgomp.so.1": "libgomp1",
    "libgfortran.so.5": "libgfortran5",
    "libquadmath.so.0": "libquadmath0",
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
    "libatomic.so.1": "libatomic1",
    "libz.so.1": "zlib1g",
    "libGL.so.1": "libgl1",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
}


def packages_for(missing: Iterable[str]) -> tuple[str, ...] | None:
    """The Debian packages providing every soname in ``missing``; None if one is unknown."""
    packages: set[str] = set()
    for soname in missing:
        package = SONAME_PACKAGES.get(soname)
        if package is None:
            return None
        packages.add(package)
    return tuple(sorted(packages)) or None


def lacking(packages: Iterable[str], libraries: Iterable[str]) -> tuple[str, ...]:
    """Those of ``packages`` (from the table) that provide a soname not in ``libraries``.

    ``packages``: what a model's requirements are known to need (dockerfile.py's table, e.g.
    libgomp1 for lightgbm); a package the table does not know is left out, never guessed.
    """
    have = set(libraries)
    wanted = set(packages)
    return tuple(
        sorted({p for soname, p in SONAME_PACKAGES.items() if p in wanted and soname not in have})
    )


def derived_tag(base_digest: str, packages: Iterable[str]) -> str:
    """The derived base's tag: equal for equal inputs, so it is built once and then reused."""
    text = f"{_FORMAT}\n{base_digest}\n" + "\n".join(sorted(set(packages)))
    return "os-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def render_derived_dockerfile(base: str, packages: Iterable[str]) -> str:
    """``base`` (a pinned reference) plus the packages, with apt's lists and caches removed.

    ``Acquire::Languages=none`` skips the translation indexes nobody reads in an image; the
    package caches and logs would otherwise add ~70 MB of apt's own bookkeeping to the layer.
    """
    names = " ".join(shlex.quote(p) for p in sorted(set(packages)))
    return (
        f"FROM {base}\n"
        "USER 0:0\n"
        "RUN apt-get -o Acquire::Languages=none update \\\n"
        " && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
        f"{names} \\\n"
        " && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \\\n"
        "      /var/log/apt /var/log/dpkg.log\n"
    )
