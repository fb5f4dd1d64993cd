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


_GROUPED_MODULE = """
import os

import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with open(os.environ["SETUPS_FILE"], "a") as f:
        f.write(f"{os.getpid()}\\n")


@pytest.mark.parametrize("i", range(8))
def test_grouped(setup, i):
    pass
"""

_UNGROUPED_MODULE = """
import pytest


@pytest.mark.parametrize("i", range(8))
def test_other(i):
    pass
"""


def test_xdist_groups_run_on_one_worker(
    tmp_path: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The integration modules that share expensive module fixtures (a service, builds) rely on
    `xdist_group` (with pyproject's `--dist loadgroup`) to set them up once. pytest 9.2 with
    pytest-xdist 3.8 silently stopped grouping (pytest-dev/pytest-xdist#1386), which this
    catches on any future upgrade."""
    setups = tmp_path / "setups.txt"
    pytester.makepyfile(test_grouped=_GROUPED_MODULE, test_other=_UNGROUPED_MODULE)
    monkeypatch.setenv("SETUPS_FILE", str(setups))
    result = pytester.runpytest_subprocess("-n", "3", "--dist", "loadgroup", "-p", "no:randomly")
    result.assert_outcomes(passed=16)
    assert len(setups.read_text().split()) == 1, "the grouped module was set up on several workers"
