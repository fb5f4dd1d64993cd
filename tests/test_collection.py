"""Every `tests/**/test_*.py` file is collected by a plain `uv run pytest`.

pytest silently skips directories matching `norecursedirs` (by default `build`, `dist`, `*.egg`,
`.*`, `venv`, ...): `tests/build/` was never run by CI for that reason. This fails instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.collection import OFFERED_KEY

TESTS_DIR = Path(__file__).resolve().parent


def test_every_test_module_is_collected(request: pytest.FixtureRequest) -> None:
    args = [Path(arg.split("::")[0]).resolve() for arg in request.config.args]
    if TESTS_DIR not in args:
        pytest.skip("only meaningful when the whole suite is collected")
    on_disk = {p.resolve() for p in TESTS_DIR.rglob("test_*.py")}
    missing = sorted(
        str(p.relative_to(TESTS_DIR)) for p in on_disk - request.config.stash[OFFERED_KEY]
    )
    assert not missing, f"pytest did not collect: {missing}"
