"""A non-editable install works away from the checkout: the wheel carries sql/, the
report templates and the default regions file, and `asmwatch` runs from another folder.

The wheel is built from this checkout and installed with ``--no-deps`` into a fresh
virtual environment that sees the project's dependencies through a ``.pth`` line (the
dependencies are the same pinned ones; installing torch again would take minutes). The
project's own folders are not on that environment's path: everything asmwatch reads
must come from the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_install_runs_outside_the_checkout(tmp_path: Path) -> None:
    # Built from a copy: setuptools reuses a build/ folder, and a checkout's old one
    # could slip files that no longer exist into the wheel.
    import shutil

    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".venv", "data", "build", "*.egg-info", ".*cache*", "__pycache__", ".git", "bench", "docs", "tests")  # fmt: skip
    shutil.copytree(ROOT, source, symlinks=True, ignore=skip)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert "Warning" not in build.stderr, build.stderr[-3000:]  # setuptools says nothing
    (wheel,) = wheels.glob("asmwatch-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())  # fmt: skip
    deps = Path(sysconfig.get_paths()["purelib"])  # this environment's packages, not the checkout
    (site / "deps.pth").write_text(f"{deps}\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASMWATCH_", "DAGSTER_HOME", "PYTHONPATH"))}  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = (
        "import assets, pipelines, sys; "
        "from pipelines.stages.catalog import load_sql; from pipelines.regions import regions_path, load_regions; "
        "print(pipelines.__file__); print(regions_path()); print(len(load_regions().regions)); "
        "print(len(load_sql('alerts')) > 100); "
        "from pipelines.stages.reports import templates; "
        "print(templates().get_template('report.html.j2').name); "
        "from pipelines.i18n import Lang; print(Lang('es')._('Legend'))"
    )  # fmt: skip
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=work, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    module, regions, n, sql, template, legend = out.stdout.split()
    assert module.startswith(str(site)) and not module.startswith(str(ROOT)), module
    assert regions.startswith(str(site)) and int(n) >= 1 and sql == "True"
    assert template == "report.html.j2" and legend == "Leyenda"  # the catalogues are packaged

    asmwatch = venv / "bin" / "asmwatch"
    version = subprocess.run([str(asmwatch), "--version"], capture_output=True, text=True, cwd=work, env=env)  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("asmwatch 0."), version.stderr
    data = tmp_path / "x"
    run = subprocess.run(
        [str(asmwatch), "run", "demo-huepetuhe", "--period", "2019", "--select", "scenes,context_layers", "--data", str(data)],
        capture_output=True, text=True, cwd=work, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (data / "scenes" / "demo-huepetuhe" / "2019.parquet").exists()
    assert (data / "context" / "demo-huepetuhe" / "concessions.parquet").exists()
    assert "0 failed" in run.stdout
