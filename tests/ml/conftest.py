"""Fixtures of the model tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def root(small_composites_root: Path, tmp_path: Path) -> Path:
    """A private copy of the small world's data root (the registry writes into it)."""
    out = tmp_path / "root"
    shutil.copytree(small_composites_root, out, ignore=shutil.ignore_patterns("models"))
    return out
