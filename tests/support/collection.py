"""What pytest was offered to collect in this session (see tests/test_collection.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Every test module pytest was offered: a directory it skips (`norecursedirs` has `build`,
# `dist`, `*.egg`, ...) never offers its files.
OFFERED_KEY = pytest.StashKey[set[Path]]()
