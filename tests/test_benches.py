"""Every bench/ script starts as docs/benchmarks.md runs it: `.venv/bin/python bench/<name>.py`.

Benchmarks are not run by the suite (they measure, and take minutes); this only proves each one
imports what it needs and parses its arguments, so a change to the test support they share
cannot break them unnoticed (one did: they imported `tests.support.servers`, which began to
import `support.web`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_benchmark_starts(script: Path) -> None:
    # As from a shell: no PYTHONPATH from this run, the script's own sys.path set-up only.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=BENCH.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
