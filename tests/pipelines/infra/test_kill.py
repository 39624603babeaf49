"""A run killed in the middle of writing (SIGKILL, no clean-up code runs): no half
file is visible, the previous output survives, and the re-run completes, removes the
orphans and gives the same bytes as a run that was never interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import small_region

ROOT = Path(__file__).resolve().parents[3]
WRITER = """
import sys
from pathlib import Path
from tests.conftest import small_region
from pipelines.stages.composite import composite_for_region

region = small_region()
composite_for_region(region, region.period(sys.argv[2]), Path(sys.argv[1]), chunk=64,
                     progress=lambda m: print(m, flush=True))
print("done", flush=True)
"""


def _composite(root: Path, period: str, kill_after_blocks: int | None = None) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), period], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.strip())
        if kill_after_blocks is not None and "blocks written" in line:
            done = int(line.split("composite: ", 1)[1].split("/", 1)[0])
            if done >= kill_after_blocks:
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait(timeout=120)
    if kill_after_blocks is None:
        assert proc.returncode == 0 and lines[-1] == "done", lines[-20:]
    else:
        assert proc.returncode == -signal.SIGKILL
    return lines


@pytest.mark.slow
def test_a_composite_killed_mid_write(small_scenes_root: Path, tmp_path: Path) -> None:
    region = small_region()
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for root in (clean, killed):
        shutil.copytree(small_scenes_root / "scenes", root / "scenes")
    _composite(clean, "2020")
    reference = (clean / "composite" / region.id / "2020.tif").read_bytes()

    out_dir = killed / "composite" / region.id
    lines = _composite(killed, "2020", kill_after_blocks=2)
    assert any("blocks written" in line for line in lines)
    assert not (out_dir / "2020.tif").exists()  # no half file where readers look
    orphans = sorted(p.name for p in out_dir.iterdir())
    assert orphans and all(n.startswith(".2020.") for n in orphans), orphans

    _composite(killed, "2020")  # the re-run
    assert sorted(p.name for p in out_dir.iterdir()) == ["2020.tif"]  # orphans removed
    assert (out_dir / "2020.tif").read_bytes() == reference

    # Killed while replacing an existing composite: the old one stays whole.
    _composite(killed, "2020", kill_after_blocks=3)
    assert (out_dir / "2020.tif").read_bytes() == reference
