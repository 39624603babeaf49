"""Data you can trust and share (issue 15): no silent wrong results, a data root that moves,
a registry that takes concurrent writers, a truly read-only ``asmwatch sql``, files other
accounts can read, and a catalog that rebuilds itself.

Real components throughout: DuckDB catalogs on disk, the demo run's real outputs (copied),
torch checkpoints, subprocesses for concurrency, and the ``asmwatch`` command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.stages.catalog import CATALOG_FILE, connect, refresh_views
from tests.conftest import ROOT, materialize
from tests.pipelines.stages.test_catalog_storage import _sites


def _count(root: Path, sql: str = "SELECT count(*) FROM asm_sites") -> int:
    con = connect(root / CATALOG_FILE, read_only=True)
    try:
        return int(con.execute(sql).fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


def _cli(*argv: str) -> tuple[int, str, str]:
    from assets.cli import main

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
    from pipelines.infra.checks import CONTRACTS, check_table
    from pipelines.stages.catalog import connect_analyst, run_analyst_query
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
    from pipelines.infra.layout import composite_path, probability_path, scenes_path
    from pipelines.regions import load_regions
    from pipelines.stages.composite import read_scene_items
    from pipelines.stages.detection import map_probability

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

    from assets.detection import mining_probability
    from assets.partitions import partition_key
    from assets.resources import AsmwatchSettings, DaskResource, TorchResource
    from ml import registry

    rec = registry.latest(demo_copy)
    assert rec is not None
    (demo_copy / "models" / rec.model_id / "model.pt").unlink()
    result = materialize(
        [mining_probability],
        partition_key=partition_key("demo-huepetuhe", "2021"),
        resources={
            "settings": AsmwatchSettings(
                data_root=str(demo_copy), regions_file=str(ROOT / "regions.yaml")
            ),
            "torch_device": TorchResource(device="cpu"),
            "dask": DaskResource(processes=False, n_workers=1),
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
from collections.abc import Iterator
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
    # Registered within a second or so of each other, they still have a strict order,
    # so ``latest`` is the last one registered, not one of a tie picked by its hash.
    times = [dt.datetime.fromisoformat(r.created_at) for r in recs]
    assert len(set(times)) == 6
    latest = registry.latest(tmp_path)
    assert latest is not None and dt.datetime.fromisoformat(latest.created_at) == max(times)
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

    from pipelines.infra.tiling import staged_cog

    old = os.umask(umask)
    try:
        _sites(tmp_path, "2021", 1)
        refresh_views(tmp_path)
        cog = tmp_path / "probability" / "r" / "2021.tif"
        profile = {"width": 64, "height": 64, "count": 1, "dtype": "float32", "crs": "EPSG:32719", "transform": Affine(10, 0, 0, 0, -10, 0)}  # fmt: skip
        with staged_cog(cog, profile) as dst:  # the writer of every raster stage
            dst.write(np.zeros((64, 64), np.float32), 1)
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
    from pipelines.stages.catalog import ensure_catalog, open_catalog

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
    from pipelines.stages.catalog import CatalogError

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


# 12, 13. The embedded STAC server: any data root, and never outliving its run ------------


def test_the_stac_server_serves_a_data_root_with_quotes_and_brackets(
    small_world: Path, tmp_path: Path
) -> None:
    """Before: a ' in the data root broke the server's SQL, and the search retried 5 min."""
    import requests

    from pipelines.embedded.server import EmbeddedStacServer
    from pipelines.embedded.simulator import load_items
    from pipelines.stages.stac.geoparquet import write_geoparquet

    d = tmp_path / "it's [ab] here"
    gp = write_geoparquet(load_items(small_world), d / "items.parquet")
    with EmbeddedStacServer(gp, d) as server:
        r = requests.post(f"{server.url}/search", json={"limit": 50}, timeout=30)
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["features"]) == len(load_items(small_world))
        safe = server._safe_dir
        assert safe is not None and safe.exists()
    assert not safe.exists()


STARTER = """
import sys
from collections.abc import Iterator
from pathlib import Path
from pipelines.embedded.server import EmbeddedStacServer
server = EmbeddedStacServer(Path(sys.argv[1]), Path(sys.argv[2]))
print(server.start(), server._safe_dir, flush=True)
sys.stdin.readline()
"""


def test_the_stac_server_dies_with_its_parent_on_kill_9(small_world: Path, tmp_path: Path) -> None:
    """Before: `kill -9` of `asmwatch demo` left the server answering for 40+ minutes."""
    import time

    import requests

    from pipelines.embedded.simulator import load_items
    from pipelines.stages.stac.geoparquet import write_geoparquet

    gp = write_geoparquet(load_items(small_world), tmp_path / "items.parquet")
    parent = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(gp), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert parent.stdout is not None
    url, safe = parent.stdout.readline().split()
    assert requests.get(f"{url}/collections", timeout=5).status_code == 200
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            requests.get(f"{url}/collections", timeout=1)
        except requests.ConnectionError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the server on {url} still answers 15 s after its parent was killed")
    time.sleep(0.5)
    assert not Path(safe).exists()


def test_runs_left_started_by_a_killed_process_are_marked_failed(tmp_path: Path) -> None:
    import dagster as dg

    from assets.runs import HOST_TAG, PID_TAG, fail_dead_runs, run_tags

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)  # fmt: skip
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:

        @dg.op
        def noop() -> None:
            pass

        @dg.job
        def j() -> None:
            noop()

        def started(tags: dict[str, str]) -> str:
            run = instance.create_run_for_job(j, tags=tags)
            instance.handle_run_event(run.run_id, dg.DagsterEvent(  # a run worker's start
                event_type_value="PIPELINE_START", job_name="j", message="started"))  # fmt: skip
            return run.run_id

        killed = started({**run_tags(), PID_TAG: dead.stdout.strip()})
        alive = started(run_tags())
        elsewhere = started({PID_TAG: dead.stdout.strip(), HOST_TAG: "another-host"})
        said: list[str] = []
        assert fail_dead_runs(instance, say=said.append) == [killed]
        status = {r: instance.get_run_by_id(r).status for r in (killed, alive, elsewhere)}  # type: ignore[union-attr]
        assert status == {
            killed: dg.DagsterRunStatus.FAILURE,
            alive: dg.DagsterRunStatus.STARTED,
            elsewhere: dg.DagsterRunStatus.STARTED,
        }
        assert len(said) == 1 and "marked failed" in said[0]


# 7. asmwatch doctor, and a catalog that leaves a broken partition out ------------------


def test_doctor_finds_truncated_deleted_and_damaged_files(
    demo_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a truncated sites file made its view return 0 rows for the period while
    region_summary still counted the sites; a truncated COG failed deep inside GDAL."""
    from ml import registry

    monkeypatch.setenv("DAGSTER_HOME", str(demo_copy / "dagster_home"))
    code, out, err = _cli("doctor", "--data", str(demo_copy))
    assert code == 0, out + err
    assert "OK:" in out and "file(s) recorded as written" in out

    before_2020 = _count(demo_copy, "SELECT count(*) FROM asm_sites WHERE period = '2020'")
    sites = demo_copy / "sites" / "demo-huepetuhe" / "2021.parquet"
    sites.write_bytes(sites.read_bytes()[: sites.stat().st_size // 2])
    status = refresh_views(demo_copy)
    assert "left out 1: sites/demo-huepetuhe/2021.parquet (not readable as Parquet" in status["asm_sites"]  # fmt: skip
    assert status["asm_sites"].startswith("2 file(s)")
    assert _count(demo_copy, "SELECT count(*) FROM asm_sites WHERE period = '2020'") == before_2020
    change = demo_copy / "change" / "demo-huepetuhe" / "2020.parquet"
    change.unlink()
    comp = demo_copy / "composite" / "demo-huepetuhe" / "2021.tif"
    comp.write_bytes(comp.read_bytes()[: comp.stat().st_size * 2 // 3])
    # The stage that reads it says which file and what to do, not only GDAL's words.
    from pipelines.regions import load_regions
    from pipelines.stages.detection import DetectionError, map_probability

    region = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    with pytest.raises(DetectionError, match=r"composite .*2021.tif: cannot read rows 0-\d+, cols 0-\d+ \(row offset 0, col offset 0.*asmwatch doctor"):  # fmt: skip
        map_probability(demo_copy, region, "2021", record=None, progress=lambda _m: None)
    rec = registry.latest(demo_copy)
    assert rec is not None
    (demo_copy / rec.path).write_bytes(b"PK\x03\x04 damaged")

    code, out, err = _cli("doctor", "--data", str(demo_copy))
    assert code == 1, out + err
    assert "sites/demo-huepetuhe/2021.parquet: not readable as Parquet" in out
    assert "change/demo-huepetuhe/2020.parquet: missing (a run recorded it as written)" in out
    assert "composite/demo-huepetuhe/2021.tif: not readable as a GeoTIFF" in out
    assert f"models/{rec.model_id}/model.pt" in out and "damaged" in out
    for line in ("asm_sites demo-huepetuhe|2021", "asm_change demo-huepetuhe|2020", "composite demo-huepetuhe|2021", "mining_model"):  # fmt: skip
        assert f"\n  {line}\n" in out, line
    assert "--select asm_sites --partition 'demo-huepetuhe|2021'" in out


def test_doctor_lists_a_region_removed_from_the_regions_file(demo_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The demo region taken out of the regions file: its partitions and files are
    listed by doctor (not silently kept as if current), and the catalog stops serving
    its rows."""
    import yaml

    from pipelines.stages.catalog import refresh_views

    monkeypatch.setenv("DAGSTER_HOME", str(demo_copy / "dagster_home"))
    doc = yaml.safe_load((ROOT / "regions.yaml").read_text())
    doc["regions"] = [r for r in doc["regions"] if r["id"] != "demo-huepetuhe"]
    other = tmp_path / "without-demo.yaml"
    other.write_text(yaml.safe_dump(doc))
    code, out, err = _cli("doctor", "--data", str(demo_copy), "--regions", str(other), "--quick")
    assert code == 0, out + err  # nothing is damaged
    for key in ("demo-huepetuhe|2019", "demo-huepetuhe|2021"):
        assert f"partition {key}: in the Dagster instance, not in {other}" in out, out
    assert f"partition demo-huepetuhe: in the Dagster instance, not in {other}" in out
    assert "region demo-huepetuhe: " in out and "sites/demo-huepetuhe/2019.parquet" in out
    assert "(4 partition(s) and " in out  # 3 periods and the region
    regions = [r["id"] for r in doc["regions"]]
    status = refresh_views(demo_copy, say=lambda _m: None, regions=regions)
    assert (
        status["regions_left_out"] == ["demo-huepetuhe"] and status["asm_sites"] == "no files yet"
    )
    assert _count(demo_copy, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'asm_sites'") == 0  # fmt: skip


# 8. A report never mixes old and new results -------------------------------------------


def test_the_report_refuses_tables_older_than_their_inputs(
    demo_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: after `alerts` failed, the report mixed the old alerts with new scores."""
    import dagster as dg

    from assets.change import asm_change
    from assets.partitions import partition_key
    from assets.reports import region_report
    from assets.resources import AsmwatchSettings
    from assets.risk import alerts, concession_risk, protected_area_pressure

    monkeypatch.setenv("DAGSTER_HOME", str(demo_copy / "dagster_home"))
    instance = dg.DagsterInstance.get()
    res = {"settings": AsmwatchSettings(data_root=str(demo_copy), regions_file=str(ROOT / "regions.yaml"))}  # fmt: skip
    key = partition_key("demo-huepetuhe", "2021")
    # asm_change runs again; the risk tables do not (as when their step failed).
    assert materialize([asm_change], partition_key=key, resources=res, instance=instance).success  # fmt: skip
    report = materialize([region_report], partition_key="demo-huepetuhe", resources=res, instance=instance, raise_on_error=False)  # fmt: skip
    assert not report.success
    failure = next(e for e in report.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message  # type: ignore[union-attr]
    for table in ("concession_risk", "protected_area_pressure", "alerts"):
        assert f"{table} demo-huepetuhe|2021 (materialised" in message, message
    assert "older than its input asm_change" in message and "re-materialise" in message
    assert "demo-huepetuhe|2020" not in message
    # Once they are re-materialised, the report is published.
    risk = [concession_risk, protected_area_pressure, alerts]
    assert materialize(risk, partition_key=key, resources=res, instance=instance).success
    assert materialize([region_report], partition_key="demo-huepetuhe", resources=res, instance=instance).success  # fmt: skip


# 15. Names are text, not maths ----------------------------------------------------------


def test_a_region_name_with_dollars_is_drawn_as_text(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    """Before: `$...$` in a region name crashed the expansion map (mathtext)."""
    import dataclasses

    import matplotlib.text

    from pipelines.regions import load_regions
    from pipelines.stages.reports import expansion_map, gather

    region = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    original = matplotlib.text.Text.draw
    for name in (r"Mina $\frac{1}$ & co", "Gold at $5 a gram", r"$x^2$"):
        data = gather(demo_run[0], dataclasses.replace(region, name=name))
        drawn: list[tuple[str, bool]] = []

        def spy(self: matplotlib.text.Text, renderer: object, seen: list[tuple[str, bool]] = drawn) -> None:  # fmt: skip
            seen.append((self.get_text(), self.get_parse_math()))
            original(self, renderer)  # type: ignore[arg-type]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(matplotlib.text.Text, "draw", spy)
            out = expansion_map(data, tmp_path / "map.png")
        titles = [(t, math) for t, math in drawn if t.startswith(name)]
        assert titles and all(math is False for _t, math in titles), drawn
        assert out.stat().st_size > 10_000


# 17. The regions file: garbage, duplicate keys, size ------------------------------------


def test_a_regions_file_of_binary_garbage_duplicate_keys_or_50_mb_is_refused_clearly(
    tmp_path: Path,
) -> None:
    """Before: a UnicodeDecodeError traceback; the last duplicate key silently won; a
    50 MB file took 11 minutes and 7 GB."""
    import time

    from pipelines.regions import MAX_REGIONS_BYTES, RegionsError, load_regions

    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(128, 256)) * 20)
    with pytest.raises(RegionsError, match=r"not UTF-8 text \(byte 0x80 at offset 0\)"):
        load_regions(garbage)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"regions:\x00\x01\x02")
    with pytest.raises(RegionsError, match="binary data"):
        load_regions(nul)
    for body, key in (
        (
            "  - id: a\n    aoi: {bbox: [0, 0, 1, 1]}\n    periods: [2020]\n    periods: [2021]\n",
            "periods",
        ),
        (
            "  - id: a\n    aoi: {bbox: [0, 0, 1, 1], bbox: [5, 5, 6, 6]}\n    periods: [2020]\n",
            "bbox",
        ),
    ):
        dup = tmp_path / "dup.yaml"
        dup.write_text("regions:\n" + body)
        with pytest.raises(RegionsError, match=f"found the key '{key}' twice"):
            load_regions(dup)
    code, _out, err = _cli("validate", str(dup))
    assert code == 1 and "twice" in err and "Traceback" not in err
    big = tmp_path / "big.yaml"
    with big.open("w") as f:
        f.write("regions:\n  - id: a\n    description: '")
        f.write("x" * (50 * 1024 * 1024))
        f.write("'\n")
    t0 = time.perf_counter()
    with pytest.raises(RegionsError, match=r"52.4 MB, over the 2 MB"):
        load_regions(big)
    assert time.perf_counter() - t0 < 1 and MAX_REGIONS_BYTES == 2_000_000


# 18. One keep rule for context layers, and examples that name features ------------------


def test_context_layers_reaching_past_the_region_pass_their_own_check(tmp_path: Path) -> None:
    """Real Guyana indigenous lands: kept because they touch the region, then failed by
    a check that wanted them inside the bbox plus 0.11 degrees. Now one rule."""
    import dataclasses

    import geopandas as gpd
    import shapely

    from pipelines.infra.checks import CONTRACTS, check_table
    from pipelines.regions import load_regions
    from pipelines.stages.context import KEEP_WITHIN_DEG, read_context, write_context
    from tests.conftest import shared

    region = load_regions(ROOT / "regions.yaml").get("cuyuni-mazaruni")
    src = shared("context/gy_indigenous_lands_amw.geojson")
    fields = {"indigenous_lands": {"id": "id", "name": "name_field"}}
    region = dataclasses.replace(region, context_fields=fields)
    layer = read_context(region, "indigenous_lands", src)
    w, s, e, n = region.bbox
    m = 0.11
    reach = layer.frame.geometry.bounds
    past = (reach.minx < w - m) | (reach.maxx > e + m) | (reach.miny < s - m) | (reach.maxy > n + m)
    assert len(layer.frame) > 0 and past.any(), "the real layer reaches past the old margin"
    path = write_context(layer, tmp_path, region.id)
    outcomes = {o.name: o for o in check_table(path, CONTRACTS["context"], region, view="indigenous_lands")}  # fmt: skip
    assert outcomes["geometry_valid"].passed, outcomes["geometry_valid"]

    # A feature that does not touch the box fails, and the example names the feature.
    frame = layer.frame.copy()
    far = frame.iloc[[0]].copy()
    far["feature_id"] = "far-away-land"
    far["geometry"] = [
        shapely.box(e + KEEP_WITHIN_DEG + 1, n + 1, e + KEEP_WITHIN_DEG + 1.1, n + 1.1)
    ]
    gpd.GeoDataFrame(pd_concat([frame, far]), crs=4326).to_parquet(path, write_covering_bbox=True, index=False)  # fmt: skip
    geo = {o.name: o for o in check_table(path, CONTRACTS["context"], region, view="indigenous_lands")}["geometry_valid"]  # fmt: skip
    assert not geo.passed and geo.metadata["examples"]["outside_region"] == ["far-away-land"]


def pd_concat(frames: list[object]) -> object:
    import pandas as pd

    return pd.concat(frames, ignore_index=True)  # type: ignore[call-overload]


# 19. An AOI across the antimeridian --------------------------------------------------


def test_an_aoi_across_the_antimeridian_is_refused_with_how_to_split_it() -> None:
    """Before: the advised two-part MultiPolygon was accepted and got UTM zone 31S."""
    from pipelines.regions import RegionsError, parse_regions

    fiji = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[177.0, -18.5], [180.0, -18.5], [180.0, -16.0], [177.0, -16.0], [177.0, -18.5]]],
            [
                [
                    [-180.0, -18.5],
                    [-178.0, -18.5],
                    [-178.0, -16.0],
                    [-180.0, -16.0],
                    [-180.0, -18.5],
                ]
            ],
        ],
    }
    doc = {"regions": [{"id": "fiji", "aoi": {"geometry": fiji}, "periods": [2024]}]}
    with pytest.raises(RegionsError, match=r"crosses the antimeridian.*two regions, one on each side"):  # fmt: skip
        parse_regions(doc)
    doc["regions"][0]["aoi"] = {"bbox": [177.0, -18.5, -178.0, -16.0]}
    with pytest.raises(RegionsError, match="two regions, one on each side"):
        parse_regions(doc)
    # Each half on its own is a region with its own zone: 60S and 1S.
    from pipelines.infra.grid import bbox_utm_epsg

    east = {"type": "Polygon", "coordinates": fiji["coordinates"][0]}  # type: ignore[index]
    west = {"type": "Polygon", "coordinates": fiji["coordinates"][1]}  # type: ignore[index]
    doc = {"regions": [
        {"id": "fiji-east", "aoi": {"geometry": east}, "periods": [2024]},
        {"id": "fiji-west", "aoi": {"geometry": west}, "periods": [2024]},
    ]}  # fmt: skip
    regions = parse_regions(doc).regions
    assert [bbox_utm_epsg(r.bbox) for r in regions] == [32760, 32701]


# 11. Fail fast, say why -------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(size_mb: int) -> Iterator[Path]:
    """A small real file system of its own (tmpfs), to fill up or make read-only."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="asmwatch-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(d)], capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def _failure(result: object) -> str:
    events = result.all_events  # type: ignore[attr-defined]
    failure = next(e for e in events if e.is_step_failure)
    return str(failure.step_failure_data.error.message)


def _retries(result: object) -> int:
    return sum(1 for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY")  # type: ignore[attr-defined]


def test_a_full_disk_and_a_read_only_root_fail_in_seconds_naming_the_cause(tmp_path: Path) -> None:
    """Before: retried for minutes like a network fault, then `TIFFAppendToStrip: Write
    error at scanline 0`."""
    import time

    from assets.composite import composite
    from assets.partitions import partition_key
    from assets.scenes import scenes
    from tests.assets.test_composite_asset import _regions_file, _resources

    regions = _regions_file(tmp_path)
    key = partition_key("demo-huepetuhe", "2020")
    with _tmpfs(48) as mnt:
        res = _resources(mnt, regions)
        assert materialize([scenes], partition_key=key, resources=res).success
        filler = mnt / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        t0 = time.monotonic()
        full = materialize([composite], partition_key=key, resources=res, raise_on_error=False)  # fmt: skip
        elapsed = time.monotonic() - t0
        assert not full.success and _retries(full) == 0 and elapsed < 60
        message = _failure(full)
        assert "no space left on device" in message and str(mnt / "data") in message, message
        assert "Retrying cannot fix this" in message
        filler.unlink()

        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        t0 = time.monotonic()
        ro = materialize([scenes], partition_key=key, resources=res, raise_on_error=False)
        assert not ro.success and _retries(ro) == 0 and time.monotonic() - t0 < 60
        message = _failure(ro)
        assert "read-only file system" in message and str(mnt / "data") in message, message


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another account needs root")
def test_a_permission_error_is_named_with_its_path(tmp_path: Path) -> None:
    """A write refused by the file system's permissions, as another account sees it
    (a forked child that drops to `nobody`: root itself is never refused)."""
    import tempfile

    from pipelines.infra.errors import deterministic_cause
    from pipelines.infra.storage import atomic_path

    d = Path(tempfile.mkdtemp(prefix="asmwatch-perm-"))
    try:
        d.chmod(0o755)
        (d / "sites").mkdir()  # root's, 0755: another account cannot write into it
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            message = "no error"
            try:
                os.setgid(65534)
                os.setuid(65534)
                with atomic_path(d / "sites" / "r" / "2021.parquet") as t:
                    t.write_text("x")
            except Exception as e:
                message = str(deterministic_cause(e, d))
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as f:
            assert f.read() == f"permission denied writing {d / 'sites' / 'r'}"
    finally:
        shutil.rmtree(d)


def test_the_instance_never_reruns_a_run_for_a_failed_step(tmp_path: Path) -> None:
    """The UI's asset job carries no tags: the instance's own setting must say it."""
    import yaml

    from assets.cli import ensure_dagster_home

    cfg = yaml.safe_load(ensure_dagster_home(tmp_path / "home").read_text())
    assert cfg["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}  # fmt: skip
    assert cfg["run_monitoring"]["enabled"] is True


# 16. Large inputs: alerts streamed to disk, point layers counted on a grid -------------


def test_alerts_are_written_streaming_with_the_rows_of_the_in_memory_query(demo_copy: Path) -> None:
    """The asset's writer (DuckDB COPY, bounded memory) writes exactly the rows and
    order of the query, as GeoParquet in EPSG:4326 that GeoPandas and DuckDB both read.
    Memory and time at 200,000 concessions: bench/alerts.py."""
    import geopandas as gpd

    from pipelines.regions import load_regions
    from pipelines.stages.risk import compute, write_rows

    region = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    import datetime as dt

    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    path = write_rows(demo_copy, "alerts", region, "2021", now=now)
    expected = compute(demo_copy, "alerts", region, "2021", now=now)
    frame = gpd.read_parquet(path)
    assert len(frame) == expected.num_rows > 0 and frame.crs.to_epsg() == 4326
    assert frame["alert_id"].tolist() == expected.column("alert_id").to_pylist()
    assert [g.wkb for g in frame.geometry] == [bytes(b) for b in expected.column("geometry").to_pylist()]  # fmt: skip
    assert {"xmin", "ymin", "xmax", "ymax"} == set(frame["bbox"].iloc[0])
    # Written with it, from the same relations: what raised each alert, feature by feature.
    features = gpd.read_parquet(path.parents[2] / "alert_features" / "demo-huepetuhe" / "2021.parquet")  # fmt: skip
    want = compute(demo_copy, "alert_features", region, "2021", now=now)
    assert len(features) == want.num_rows >= len(frame) and features.crs.to_epsg() == 4326
    assert set(features["alert_id"]) == set(frame["alert_id"])
    assert (frame.groupby("change_id").size() == 1).all()  # one alert per change area
    # The baseline period has no alerts: still a GeoParquet table DuckDB reads as geometry.
    empty = write_rows(demo_copy, "alerts", region, "2019", now=now)
    assert gpd.read_parquet(empty).empty
    refresh_views(demo_copy)
    con = connect(demo_copy / CATALOG_FILE, read_only=True)
    types = {r[0]: r[1] for r in con.execute("DESCRIBE alerts").fetchall()}
    con.close()
    assert types["geometry"].startswith("GEOMETRY")


def test_a_large_grievance_log_reaches_the_web_map_as_counts_on_a_grid(demo_copy: Path) -> None:
    """Before: 1,000,000 grievances made a 266 MB web map and a 72 s report."""
    import json

    from bench.report import write_grievances
    from pipelines.regions import load_regions
    from pipelines.stages.reports import MAX_POINTS, gather, web_data

    n = 3 * MAX_POINTS
    write_grievances(demo_copy, n)
    region = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    data = gather(demo_copy, region)
    cells = data.context["grievances"]
    assert 0 < len(cells) <= MAX_POINTS and sum(c["points"] for c in cells) == n
    open_total = _count(demo_copy, "SELECT count(*) FROM grievances WHERE status = 'open'")
    assert sum(int(c["status"].split()[0].replace(",", "")) for c in cells) == open_total
    doc = web_data(data)["context"]["grievances"]
    assert doc["points"] == n and doc["cell_deg"] >= 0.001
    assert len(json.dumps(doc)) < 2_000_000
    # Few points stay points: the demo's own settlements.
    assert "points" not in data.context["settlements"][0]


def test_a_dagster_home_with_glob_characters_still_reads_its_dagster_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster globs for $DAGSTER_HOME/dagster.yaml: under `data [ab]` it found nothing and
    ran on its defaults (telemetry on, the Welcome banner, no retry settings)."""
    import dagster as dg

    from assets.cli import use_dagster_home

    root = tmp_path / "data [ab]"
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = use_dagster_home(root)
    assert (root / "dagster_home" / "dagster.yaml").exists()
    assert home.is_symlink() and home.resolve() == (root / "dagster_home").resolve()
    instance = dg.DagsterInstance.get()
    assert instance.telemetry_enabled is False
    assert instance.run_retries_retry_on_asset_or_op_failure is False
    assert use_dagster_home(root) == home  # the same link again
