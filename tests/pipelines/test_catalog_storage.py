"""DuckDB catalog (spatial loaded from its package, offline) and atomic writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.catalog import connect, extension_directory, refresh_views, sql_literal
from pipelines.storage import atomic_dir, atomic_path, write_json


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
    from pipelines.catalog import VIEWS

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
