"""Fixtures of the model tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from ml.train import TrainConfig

#: The short training of the quality tests: 64 px chips, 15 epochs of 10 batches of 8
#: (the point-label model trains on the same schedule as the dense one it is held to).
SHORT = TrainConfig(chip=64, batch=8, steps_per_epoch=10, max_epochs=15, patience=5, seed=7)


@pytest.fixture
def root(small_composites_root: Path, tmp_path: Path) -> Path:
    """A private copy of the small world's data root (the registry writes into it)."""
    out = tmp_path / "root"
    shutil.copytree(small_composites_root, out, ignore=shutil.ignore_patterns("models"))
    return out


@pytest.fixture(scope="session")
def dense_model(
    small_composites_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any]:
    """(data root, record): the U-Net trained on the small world's dense truth masks
    with ``SHORT``, once for the session. The quality test maps with it; the
    point-label test holds its points model to its held-out IoU."""
    from pipelines.stages.detection import train_mining_model
    from tests.conftest import small_region

    out = tmp_path_factory.mktemp("dense") / "root"
    shutil.copytree(small_composites_root, out, ignore=shutil.ignore_patterns("models"))
    trained = train_mining_model(out, [small_region()], config=SHORT, progress=print)
    return out, trained.record
