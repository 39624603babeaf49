"""DuckDB catalog (spatial loaded from its package, offline) and atomic writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.infra.storage import atomic_dir, atomic_path, write_json
from pipelines.stages.catalog import connect, extension_directory, refresh_views, sql_literal


def test_connect_loads_spatial_by_path_and_never_autoinstalls() -> None:
    con = connect()
    assert con.execute("SELECT ST_AsText(ST_Point(1, 2))").fetchone() == ("POINT (1 2)",)
    row = con.execute(
        "SELECT loaded, install_path FROM duckdb_extensions() WHERE extension_name = 'spatial'"
    ).fetchone()
    assert row is not None and row[0] is True
    assert con.execute("SELECT current_setting('autoinstall_known_extensions')").fetchone() == (
        False,
    )


def test_extension_directory_layout(tmp_path: Path) -> None:
    d = extension_directory(tmp_path / "ext")
    files = sorted(p.name for p in (d / "v1.5.5" / "linux_amd64").iterdir())
    assert files == ["icu.duckdb_extension", "parquet.duckdb_extension", "spatial.duckdb_extension"]
    extension_directory(tmp_path / "ext")  # idempotent


def test_refresh_views_without_files_drops_view(tmp_path: Path) -> None:
    from pipelines.stages.catalog import VIEWS

    assert refresh_views(tmp_path) == dict.fromkeys(VIEWS, "no files yet")
    assert {"scenes", "asm_change", "protected_areas", "protected_area_pressure"} <= set(VIEWS)
    con = connect(tmp_path / "asmwatch.duckdb", read_only=True)
    assert con.execute(
        "SELECT count(*) FROM duckdb_views() WHERE view_name='scenes'"
    ).fetchone() == (0,)


def test_sql_literal_escapes_quotes() -> None:
    con = connect()
    odd = "/tmp/it's here"
    assert con.execute(f"SELECT {sql_literal(odd)}").fetchone() == (odd,)


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "t.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary left behind


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "world"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(ValueError), atomic_dir(target) as d:
        (d / "b").write_text("2")
        raise ValueError("bad input")
    assert sorted(os.listdir(target)) == ["a"]
    with atomic_dir(target) as d:
        (d / "c").write_text("3")
    assert sorted(os.listdir(target)) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


ANALYST = """
import sys, time
from pipelines.stages.catalog import connect
con = connect(sys.argv[1], read_only=True)
print(con.execute("SELECT count(*) FROM asm_sites").fetchone()[0], flush=True)
sys.stdin.readline()  # hold the connection open until told
print(con.execute("SELECT count(*) FROM asm_sites").fetchone()[0], flush=True)
"""


def _sites(root: Path, period: str, n: int) -> None:
    import geopandas as gpd
    import shapely

    from pipelines.infra.layout import sites_path
    from pipelines.stages.sites import COLUMNS, conform, write_sites

    frame = gpd.GeoDataFrame(
        {"site_id": [f"s{i}" for i in range(n)], "region": "r", "period": period,
         "area_ha": 1.0, "mean_probability": 0.9, "mapped_area_ha": float("nan"),
         "first_seen_period": period, "source": "test"},
        geometry=[shapely.box(i, 0, i + 0.001, 0.001) for i in range(n)], crs=4326,
    )  # fmt: skip
    write_sites(conform(frame[list(COLUMNS)]), sites_path(root, "r", period))


def test_an_analysts_open_session_never_blocks_a_run(tmp_path: Path) -> None:
    """A read-only connection held by another process while a run refreshes the views:
    the run goes through at once, the analyst keeps a consistent catalog, and the next
    connection sees the new table."""
    import subprocess
    import sys
    import time

    _sites(tmp_path, "2020", 2)
    refresh_views(tmp_path)
    db = tmp_path / "asmwatch.duckdb"
    analyst = subprocess.Popen(
        [sys.executable, "-c", ANALYST, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=Path(__file__).resolve().parents[3],
    )  # fmt: skip
    try:
        assert analyst.stdout is not None and analyst.stdin is not None
        assert analyst.stdout.readline().strip() == "2"
        _sites(tmp_path, "2021", 3)
        t0 = time.monotonic()
        status = refresh_views(tmp_path)
        assert time.monotonic() - t0 < 5  # not the 30 s lock wait of a shared file
        assert status["asm_sites"] == "2 file(s)"
        con = connect(db, read_only=True)
        assert con.execute("SELECT count(*) FROM asm_sites").fetchone() == (5,)
        con.close()
        analyst.stdin.write("\n")
        analyst.stdin.flush()
        # The connection the analyst opened before the refresh still works, on the
        # catalog it opened (views list their files): a consistent snapshot.
        assert analyst.stdout.readline().strip() == "2"
        assert analyst.wait(timeout=30) == 0
    finally:
        analyst.kill()
    assert not list(tmp_path.glob(".asmwatch.duckdb.*.tmp*"))


def test_concurrent_refreshes_take_turns(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _sites(tmp_path, "2020", 1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _i: refresh_views(tmp_path), range(8)))
    assert all(r["asm_sites"] == "1 file(s)" for r in results)
    con = connect(tmp_path / "asmwatch.duckdb", read_only=True)
    assert con.execute("SELECT count(*) FROM asm_sites").fetchone() == (1,)
    con.close()


def test_orphans_of_dead_writers_go_and_live_ones_stay(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".2021.parquet.{dead_pid}.abc.tmp"
    live = tmp_path / f".2021.parquet.{os.getpid()}.def.tmp"  # a concurrent writer's
    other = tmp_path / f".2020.parquet.{dead_pid}.ghi.tmp"  # another target's
    for p in (orphan, live, other):
        p.write_text("half")
    (tmp_path / "2021.parquet").write_text("old")
    with atomic_path(tmp_path / "2021.parquet") as tmp:
        assert tmp.name.startswith(f".2021.parquet.{os.getpid()}.")
        tmp.write_text("new")
    assert not orphan.exists() and live.exists() and other.exists()
    assert (tmp_path / "2021.parquet").read_text() == "new"


def test_a_table_from_an_older_version_does_not_take_the_catalog_down(tmp_path: Path) -> None:
    """Sites written before a column existed: that one view is reported, the others stay."""
    import geopandas as gpd

    _sites(tmp_path, "2021", 2)
    path = tmp_path / "sites" / "r" / "2021.parquet"
    old = gpd.read_parquet(path).drop(columns=["source", "first_seen_period", "mapped_area_ha"])
    old.to_parquet(path, write_covering_bbox=True, index=False)
    (tmp_path / "models").mkdir()
    import pandas as pd

    pd.DataFrame(
        {"model_id": ["m1"], "created_at": ["2026-11-22T00:00:00Z"], "kind": ["unet"],
         "input_hash": ["h"], "path": ["p"], "device": ["cpu"], "seconds": [1.0],
         "train_data": ["[]"], "metrics": ['{"heldout": {"iou": 0.9}, "baseline_heldout": {"iou": 0.7}}'],
         "config": ["{}"]}
    ).to_parquet(tmp_path / "models" / "models.parquet")  # fmt: skip
    status = refresh_views(tmp_path)
    assert status["asm_sites"].startswith("error: ") and "re-materialise" in status["asm_sites"]
    con = connect(tmp_path / "asmwatch.duckdb", read_only=True)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}  # fmt: skip
    heldout = con.execute("SELECT heldout_iou FROM models").fetchone()
    con.close()
    assert "asm_sites" not in views and "models" in views and status["models"] == "1 file(s)"
    assert heldout == (0.9,)
