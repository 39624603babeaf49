"""Data you can trust and share (issue 15): no silent wrong results, a data root that moves,
a registry that takes concurrent writers, a truly read-only ``asmwatch sql``, files other
accounts can read, and a catalog that rebuilds itself.

Real components throughout: DuckDB catalogs on disk, the demo run's real outputs (copied),
torch checkpoints, subprocesses for concurrency, and the ``asmwatch`` command.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.catalog import CATALOG_FILE, connect, refresh_views
from tests.conftest import ROOT
from tests.pipelines.test_catalog_storage import _sites


def _count(root: Path, sql: str = "SELECT count(*) FROM asm_sites") -> int:
    con = connect(root / CATALOG_FILE, read_only=True)
    try:
        return int(con.execute(sql).fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


def _cli(*argv: str) -> tuple[int, str, str]:
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def demo_copy(demo_run: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the demo run's data root (tests may damage it)."""
    root = tmp_path / "data"
    shutil.copytree(demo_run[0], root, symlinks=True)
    return root


# 1. Glob characters in the data root -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "decoy"),
    [
        ("data [ab]", "data a"),
        ("d*s", "dXs"),
        ("d?q", "dzq"),
        ("d{x,y}", "dx"),
        ("it's here", None),
        ("sp ace ]", None),
    ],
)
def test_glob_characters_in_the_data_root_never_read_another_folder(
    tmp_path: Path, name: str, decoy: str | None
) -> None:
    """Before: ``read_parquet('<root>/sites/*/*.parquet')`` with root ``data [ab]``
    read ``data a``'s files, and every check passed."""
    from pipelines.catalog import connect_analyst, run_analyst_query
    from pipelines.checks import CONTRACTS, check_table
    from tests.conftest import small_region

    root = tmp_path / name
    _sites(root, "2021", 2)
    if decoy is not None:
        _sites(tmp_path / decoy, "2021", 5)
        refresh_views(tmp_path / decoy)
    status = refresh_views(root)
    assert status["asm_sites"] == "1 file(s)"
    assert _count(root) == 2
    con = connect_analyst(root)
    assert run_analyst_query(con, "SELECT count(*) FROM asm_sites").fetchone() == (2,)  # type: ignore[union-attr]
    con.close()
    # The contract checks read the file itself, by an escaped path.
    outcomes = check_table(root / "sites" / "r" / "2021.parquet", CONTRACTS["asm_sites"], small_region())  # fmt: skip
    non_empty = next(o for o in outcomes if o.name == "non_empty")
    assert non_empty.metadata["rows"] == 2, non_empty


# 2. A data root that moves ------------------------------------------------------------


def test_a_moved_data_root_reads_its_own_files_and_model(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    """Copy the demo's root, copy the copy, delete the first: the last one's catalog,
    registry and scenes all read the last one. Before: the registry's absolute paths
    sent mining_probability to the index baseline, and the catalog read the original."""
    import numpy as np
    import rasterio

    from ml import registry
    from pipelines.composite import composite_path, read_scene_items
    from pipelines.detection import map_probability, probability_path
    from pipelines.regions import load_regions
    from pipelines.scenes import scenes_path

    demo = demo_run[0]
    region = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    first = tmp_path / "first"
    shutil.copytree(demo, first, symlinks=True)
    moved = tmp_path / "srv" / "data"
    shutil.copytree(first, moved, symlinks=True)
    shutil.rmtree(first)

    # The catalog, unchanged since the demo wrote it, reads the moved files.
    assert _count(moved) == _count(demo)
    assert _count(moved, "SELECT count(*) FROM concession_risk") == _count(demo, "SELECT count(*) FROM concession_risk")  # fmt: skip
    # The registry finds its checkpoint in the moved root.
    rec = registry.latest(moved)
    assert rec is not None and not Path(rec.path).is_absolute()
    assert registry.checkpoint_problem(moved, rec) is None
    # Scenes name the embedded world's COGs relative to the scenes file.
    items = read_scene_items(scenes_path(moved, region.id, "2021"))
    hrefs = [a["href"] for i in items for a in i["assets"].values()]
    assert hrefs and all(Path(h).is_relative_to(moved.resolve()) for h in hrefs)
    # mining_probability uses the model, and maps exactly what the demo mapped.
    res = map_probability(moved, region, "2021", record=rec, progress=lambda _m: None)
    assert res.detector == rec.model_id
    with rasterio.open(res.path) as a, rasterio.open(probability_path(demo, region.id, "2021")) as b:  # fmt: skip
        np.testing.assert_array_equal(a.read(1), b.read(1))
    assert composite_path(moved, region.id, "2021").exists()

    # A registered model whose file is gone fails, naming the file: no quiet baseline.
    (moved / "models" / rec.model_id / "model.pt").unlink()
    with pytest.raises(registry.RegistryError, match=r"models/" + rec.model_id + r"/model.pt is missing"):  # fmt: skip
        map_probability(moved, region, "2021", record=registry.latest(moved), progress=lambda _m: None)  # fmt: skip


def test_a_missing_model_fails_the_asset_run_naming_the_file(demo_copy: Path) -> None:
    import dagster as dg

    from assets.detection import mining_probability
    from assets.partitions import partition_key
    from assets.resources import AsmwatchSettings, TorchResource
    from ml import registry

    rec = registry.latest(demo_copy)
    assert rec is not None
    (demo_copy / "models" / rec.model_id / "model.pt").unlink()
    result = dg.materialize(
        [mining_probability],
        partition_key=partition_key("demo-huepetuhe", "2021"),
        resources={
            "settings": AsmwatchSettings(
                data_root=str(demo_copy), regions_file=str(ROOT / "regions.yaml")
            ),
            "torch_device": TorchResource(device="cpu"),
        },
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message  # type: ignore[union-attr]
    assert f"{rec.model_id}/model.pt is missing" in message and "retrain" in message
    # No retries for a missing file: one attempt.
    assert sum(1 for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY") == 0


# 3. The registry under concurrent writers ---------------------------------------------

REGISTER = """
import sys, time
from pathlib import Path
from ml import registry
from ml.features import Normalizer
from ml.models import UnetSpec, build_unet
root, start = Path(sys.argv[1]), float(sys.argv[2])
spec = UnetSpec(encoder="resnet18", in_channels=9)
model = build_unet(spec)
while time.time() < start:
    time.sleep(0.001)
registry.register(root, model, spec, Normalizer((0.0,) * 9, (1.0,) * 9), input_hash_="same-inputs-0001",
                  device="cpu", seconds=1.0, train_data=[], metrics={"heldout": {"iou": 0.5},
                  "baseline_heldout": {"iou": 0.4}, "threshold": 0.5}, config={})
"""


def test_six_processes_registering_at_once_keep_six_models(tmp_path: Path) -> None:
    """Before: read-modify-write without a lock left 6 folders and 1 row."""
    import time

    from ml import registry

    start = time.time() + 8  # every process has imported torch by then
    procs = [
        subprocess.Popen([sys.executable, "-c", REGISTER, str(tmp_path), str(start)], cwd=ROOT)
        for _ in range(6)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    recs = registry.records(tmp_path)
    folders = sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir())
    assert len(recs) == 6 and len(folders) == 6
    assert sorted(r.model_id for r in recs) == folders
    # A damaged table is rebuilt from the folders' metadata.json, with a line saying so.
    (tmp_path / "models" / "models.parquet").write_bytes(b"\0" * 100)
    said: list[str] = []
    assert sorted(r.model_id for r in registry.records(tmp_path, say=said.append)) == folders
    assert len(said) == 1 and "damaged" in said[0] and "rebuilding" in said[0]
    assert len(registry.records(tmp_path, say=said.append)) == 6 and len(said) == 1


def test_a_damaged_checkpoint_names_the_file_and_never_suggests_unsafe_loading(
    tmp_path: Path,
) -> None:
    from ml import registry

    bad = tmp_path / "model.pt"
    for content in (b"not a checkpoint", b"PK\x03\x04" + b"\0" * 64):
        bad.write_bytes(content)
        with pytest.raises(registry.RegistryError) as err:
            registry.load(tmp_path, bad)
        message = str(err.value)
        assert str(bad) in message and "damaged" in message and "retrain" in message
        assert "weights_only" not in message


# 4. asmwatch sql is read-only -----------------------------------------------------------


def test_asmwatch_sql_cannot_write_or_read_outside_the_data_root(demo_copy: Path) -> None:
    """Before: COPY emptied a source table and read_text('/etc/passwd') worked."""
    target = demo_copy / "sites" / "demo-huepetuhe" / "2021.parquet"
    size = target.stat().st_size
    rows = _count(demo_copy, "SELECT count(*) FROM asm_sites WHERE period = '2021'")
    assert rows > 0
    attacks = [
        f"COPY (SELECT * FROM asm_sites WHERE false) TO '{target}' (FORMAT parquet)",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT 1; SET enable_external_access = true",
        f"ATTACH '{demo_copy / 'x.duckdb'}'",
        "SELECT * FROM read_text('~/../../../../etc/passwd')",
        "INSTALL httpfs",
    ]
    for attack in attacks:
        code, out, err = _cli("sql", attack, "--data", str(demo_copy))
        assert code in (1, 2), (attack, out)
        assert "Traceback" not in err and "root:" not in out, attack
    assert target.stat().st_size == size and not (demo_copy / "x.duckdb").exists()
    assert _count(demo_copy, "SELECT count(*) FROM asm_sites WHERE period = '2021'") == rows
    # Reading works, with the spatial extension.
    code, out, err = _cli(
        "sql", "SELECT count(*) AS n, round(sum(ST_Area(geometry)) * 1e6, 3) > 0 AS ok FROM asm_sites",
        "--data", str(demo_copy), "--format", "csv",
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines() == ["n,ok", f"{_count(demo_copy)},True"]
    # A typo gets one clear line, not a traceback.
    code, _out, err = _cli("sql", "SELEC * FROM asm_sites", "--data", str(demo_copy))
    assert code == 2 and "syntax error" in err and "Traceback" not in err


# 9. Files other accounts can read --------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Before: every table, COG and checkpoint was 0600 (mkstemp)."""
    import numpy as np
    from affine import Affine

    from pipelines.detection import _write_probability

    old = os.umask(umask)
    try:
        _sites(tmp_path, "2021", 1)
        refresh_views(tmp_path)
        cog = tmp_path / "probability" / "r" / "2021.tif"
        _write_probability(cog, np.zeros((64, 64), np.float32), Affine(10, 0, 0, 0, -10, 0), "EPSG:32719", "t", 0.5)  # fmt: skip
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (tmp_path / "sites" / "r" / "2021.parquet", cog, tmp_path / CATALOG_FILE):
        assert path.stat().st_mode & 0o777 == want, path


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another account needs root")
def test_another_account_reads_the_demo_outputs(demo_run: tuple[Path, str]) -> None:
    """As `nobody`, read a table, a COG, a checkpoint and the catalog of a real run."""
    import tempfile

    shared_dir = Path(tempfile.mkdtemp(prefix="asmwatch-share-"))
    try:
        shared_dir.chmod(0o755)
        root = shared_dir / "data"
        shutil.copytree(demo_run[0], root, symlinks=True, copy_function=shutil.copy2)
        for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            d.chmod(d.stat().st_mode | 0o055)  # copytree keeps modes: folders as written
        files = [
            root / "sites" / "demo-huepetuhe" / "2021.parquet",
            root / "composite" / "demo-huepetuhe" / "2021.tif",
            root / "risk" / "alerts" / "demo-huepetuhe" / "2021.parquet",
            next((root / "models").glob("*/model.pt")),
            root / CATALOG_FILE,
        ]
        for f in files:
            r = subprocess.run(["cat", str(f)], user=65534, capture_output=True)
            assert r.returncode == 0, (f, r.stderr)
    finally:
        shutil.rmtree(shared_dir)


# 10. The catalog rebuilds itself -----------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "zeroed", "garbage", "truncated"])
def test_a_missing_or_damaged_catalog_is_rebuilt_with_one_line(
    demo_copy: Path, damage: str
) -> None:
    from pipelines.catalog import ensure_catalog, open_catalog

    db = demo_copy / CATALOG_FILE
    rows = _count(demo_copy)
    if damage == "missing":
        db.unlink()
    elif damage == "zeroed":
        db.write_bytes(b"\0" * db.stat().st_size)
    elif damage == "garbage":
        db.write_bytes(os.urandom(4096))
    else:
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    said: list[str] = []
    ensure_catalog(demo_copy, say=said.append)
    assert len(said) == 1 and "rebuilding it from the files" in said[0], said
    assert "Close other sessions" not in said[0]
    con = open_catalog(demo_copy, say=said.append)
    assert con.execute("SELECT count(*) FROM asm_sites").fetchone() == (rows,)
    con.close()
    assert len(said) == 1  # nothing more to say once rebuilt
    # `asmwatch sql` does the same, and says so on stderr.
    db.write_bytes(b"")
    code, out, err = _cli("sql", "SELECT count(*) AS n FROM asm_sites", "--data", str(demo_copy), "--format", "csv")  # fmt: skip
    assert code == 0 and out.splitlines()[1] == str(rows) and "rebuilding" in err


def test_only_a_held_lock_mentions_other_sessions(tmp_path: Path) -> None:
    from pipelines.catalog import CatalogError

    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(os.urandom(8192))
    with pytest.raises(CatalogError) as err:
        connect(bad, read_only=True)
    assert "Close other sessions" not in str(err.value) and str(bad) in str(err.value)
    db = tmp_path / "held.duckdb"
    hold = f"import duckdb, sys; c = duckdb.connect({str(db)!r}); print('held', flush=True); sys.stdin.readline()"  # fmt: skip
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CatalogError, match="Close other sessions"):
            connect(db, read_only=True, lock_timeout_s=0.5)
    finally:
        holder.kill()
