"""The asmwatch command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from assets.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "regions.yaml")]) == 0
    out = capsys.readouterr().out
    assert "OK, 7 region(s)" in out and "demo-huepetuhe" in out


def test_validate_prints_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "regions.yaml"
    bad.write_text(
        "regions:\n"
        "  - id: a\n    aoi: {bbox: [10, 5, 9, 6]}\n    periods: [2021]\n"
        "  - id: a\n    aoi: {bbox: [10, 5, 11, 6]}\n    periods: [2021]\n    source: nowhere\n"
        "  - id: 'x/../y'\n    aoi: {bbox: [10, 5, 11, 6]}\n    periods: [{id: p, start: 2021-05-01, end: 2021-01-01}]\n"
    )
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err or "problem(s)" in err
    assert "regions[0] (a).aoi.bbox: west (10.0) must be less than east (9.0)" in err
    assert "regions[1] (a).source: unknown source 'nowhere'" in err
    assert "regions[2] (x/../y).id" in err and "is not a safe id" in err
    assert "is after end" in err


@pytest.mark.slow
def test_demo_runs_and_prints_where_results_are(
    demo_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path, out = demo_run
    for period, n in (("2019", 4), ("2020", 3), ("2021", 4)):
        assert f"  {period}: {n} scenes" in out
        assert (tmp_path / "scenes" / "demo-huepetuhe" / f"{period}.parquet").exists()
        cog = tmp_path / "composite" / "demo-huepetuhe" / f"{period}.tif"
        assert cog.exists() and str(cog) in out
    assert out.count("% clear, mean ") == 3
    assert "mining_model: unet-" in out and "held-out IoU" in out
    assert out.count("ha detected (truth") == 3 and out.count(" ha >= 0.5 ha)") == 3
    for period in ("2019", "2020", "2021"):
        assert (tmp_path / "probability" / "demo-huepetuhe" / f"{period}.tif").exists()
    assert str(tmp_path / "asmwatch.duckdb") in out
    # The summary the issue asks for: area per period, growth, top-risk concessions,
    # alerts, and where the report and the web map are.
    assert "Summary (region_summary):" in out and "Concession risk 2021" in out
    assert "Alerts 2021:" in out
    reports = tmp_path / "reports" / "demo-huepetuhe"
    for name in ("report.html", "webmap.html", "expansion.png"):
        assert str(reports / name) in out and (reports / name).stat().st_size > 10_000
    assert main(["sql", "SELECT count(*) AS n FROM scenes", "--data", str(tmp_path)]) == 0
    assert "11" in capsys.readouterr().out
    assert main(["sql", "SELECT count(*) AS n FROM models", "--data", str(tmp_path)]) == 0
    assert "1" in capsys.readouterr().out
    q = "SELECT count(DISTINCT period) AS periods FROM asm_sites"
    assert main(["sql", q, "--data", str(tmp_path)]) == 0
    assert "3" in capsys.readouterr().out


def test_backfill_refuses_an_unknown_region_or_period(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regions = str(ROOT / "regions.yaml")
    assert main(["backfill", "nowhere", "--data", str(tmp_path), "--regions", regions]) == 2
    assert "nowhere" in capsys.readouterr().err
    argv = ["backfill", "demo-huepetuhe", "--periods", "2019,1999", "--data", str(tmp_path)]
    assert main([*argv, "--regions", regions]) == 2
    err = capsys.readouterr().err
    assert "'1999'" in err and "2019, 2020, 2021" in err
    assert not (tmp_path / "scenes").exists()  # nothing ran


@pytest.mark.slow
def test_demo_reports_a_failed_run_and_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An impossible clear-sky threshold fails the composite check: the demo says where."""
    import yaml

    regions = tmp_path / "regions.yaml"
    regions.write_text(
        yaml.safe_dump(
            {"regions": [{"id": "demo-huepetuhe", "aoi": {"bbox": [-70.55, -13.0, -70.525, -12.975]},
                          "periods": [2019, 2020], "source": "embedded", "min_valid_fraction": 1.0,
                          "embedded": {"seed": 7, "scenes_per_period": 3}}]}
        )
    )  # fmt: skip
    monkeypatch.setenv("ASMWATCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("ASMWATCH_REGIONS", str(regions))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert main(["demo", "--data", str(tmp_path / "data"), "--regions", str(regions)]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "2019: FAILED (ingest demo-huepetuhe|2019); see the run" in err and "asmwatch ui" in err
    assert "asmwatch demo: FAILED at " in err and "composite: valid_fraction" in err
    assert not [line for line in captured.out.splitlines() if line.startswith("  2020:")]  # stopped


def _probe_regions(tmp_path: Path, source: str) -> Path:
    import yaml

    from tests.conftest import small_region

    r = small_region()
    doc = {"regions": [{
        "id": r.id, "name": r.name, "aoi": {"bbox": list(r.bbox)},
        "periods": [p.id for p in r.periods], "source": source, "max_cloud_cover": r.max_cloud_cover,
    }]}  # fmt: skip
    path = tmp_path / "regions.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_probe_searches_and_read_checks_the_clearest_scenes(
    small_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.stages.stac.search import search_scenes
    from tests.conftest import small_region

    regions = _probe_regions(tmp_path, small_server)
    data = tmp_path / "data"
    rc = main(["probe", "test-small", "--period", "2020", "--regions", str(regions), "--data", str(data)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    expected = search_scenes(small_server, small_region(), small_region().period("2020"))
    assert f"{expected.returned} item(s) returned, {len(expected.scenes)} scene(s) kept" in out
    clearest = sorted(expected.scenes, key=lambda s: (s.cloud_cover or 0.0, s.id))[:2]
    for s in clearest:
        assert any(line.strip().startswith(s.id) and line.endswith("OK") for line in out.splitlines()), s.id  # fmt: skip
    assert f"OK: test-small can be materialised from {small_server}" in out
    assert not data.exists()  # a probe writes nothing


def test_probe_names_an_unreadable_band(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.embedded.server import EmbeddedStacServer
    from pipelines.embedded.simulator import load_items, simulate_world
    from pipelines.stages.stac.geoparquet import write_geoparquet
    from tests.conftest import small_region

    world = tmp_path / "world"
    simulate_world(small_region(periods=("2020",)), world)
    items = load_items(world)
    with EmbeddedStacServer(write_geoparquet(items, tmp_path / "serve" / "items.parquet"), tmp_path / "serve") as server:  # fmt: skip
        regions = _probe_regions(tmp_path, server.url)
        # Every scene kept (a reprocessed _1_ twin replaces its _0_) is read-checked:
        # damage one band of the clearest.
        ids = {i["id"] for i in items}
        kept = [i for i in items if "_1_" in i["id"] or i["id"].replace("_0_", "_1_") not in ids]
        clearest = min(kept, key=lambda i: (i["properties"]["eo:cloud_cover"], i["id"]))
        swir = Path(clearest["assets"]["swir16"]["href"].removeprefix("file://"))
        swir.write_bytes(swir.read_bytes()[:300])  # truncated
        rc = main(["probe", "test-small", "--period", "2020", "--scenes", "9", "--regions", str(regions)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1, out
    (bad,) = [line for line in out.splitlines() if "UNREADABLE" in line]
    assert bad.strip().startswith(clearest["id"]) and f"swir16: {swir.as_uri()}" in bad
    assert sum(line.endswith("  OK") for line in out.splitlines()) == len(kept) - 1
    assert "FAILED: some scenes of test-small cannot be read from here" in out


def test_probe_fails_clearly_on_an_unreachable_api_or_unknown_period(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regions = _probe_regions(tmp_path, "http://127.0.0.1:9/")
    assert main(["probe", "test-small", "--regions", str(regions)]) == 1
    assert "FAILED: cannot open STAC API http://127.0.0.1:9/" in capsys.readouterr().err
    assert main(["probe", "test-small", "--period", "1999", "--regions", str(regions)]) == 2
    assert "has no period '1999' (it has: 2019, 2020, 2021)" in capsys.readouterr().err
    assert main(["probe", "nowhere", "--regions", str(regions)]) == 2
    assert "no region 'nowhere'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_takes_an_imported_detections_region_offline(tmp_path: Path) -> None:
    """`asmwatch run` on a region whose sites come from a file: no imagery and no model
    are needed, so its STAC source (refusing connections here) is never called; every
    other asset is materialised, periods in order, one line each; a selection and
    `--from` run only what they name; an unknown asset fails in a second."""
    import contextlib
    import io

    import geopandas as gpd
    import shapely.geometry
    import yaml

    squares = [shapely.geometry.box(-70.54 + 0.004 * i, -12.99, -70.537 + 0.004 * i, -12.987) for i in range(3)]  # fmt: skip
    gpd.GeoDataFrame({"period": ["2020", "2021", "2021"]}, geometry=squares, crs=4326).to_file(tmp_path / "found.geojson")  # fmt: skip
    park = shapely.geometry.box(-70.545, -12.995, -70.53, -12.98)
    gpd.GeoDataFrame({"name": ["Reserva"]}, geometry=[park], crs=4326).to_file(tmp_path / "pa.geojson")  # fmt: skip
    conc = shapely.geometry.box(-70.536, -12.992, -70.526, -12.984)
    gpd.GeoDataFrame({"concession_id": ["C1"], "name": ["Mina"]}, geometry=[conc], crs=4326).to_file(tmp_path / "c.geojson")  # fmt: skip
    region = {
        "id": "imported", "name": "Imported detections", "aoi": {"bbox": [-70.56, -13.01, -70.51, -12.965]},
        "periods": [2020, 2021], "source": "http://127.0.0.1:9/stac",
        "detections": {"file": "found.geojson", "mode": "new"},
        "context": {"protected_areas": "pa.geojson", "concessions": "c.geojson"},
    }  # fmt: skip
    regions = tmp_path / "regions.yaml"
    regions.write_text(yaml.safe_dump({"regions": [region]}))
    root = tmp_path / "data"

    def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*argv, "--data", str(root), "--regions", str(regions)])
        return code, out.getvalue(), err.getvalue()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        code, out, err = cli("run", "imported")
        assert code == 0, out + err
        assert "scenes, composite, mining_model, mining_probability left out" in out
        lines = [line.strip() for line in out.splitlines()]
        first = [line.split(":")[0] for line in lines if line.split(":")[0] in ("2020", "2021", "context layers", "region report")]  # fmt: skip
        assert first == ["context layers", "2020", "2021", "region report"], out
        assert any(line.startswith("2021: 3 sites") and line.endswith(" s]") for line in lines), out
        assert not (root / "scenes").exists() and not (root / "composite").exists()
        assert (root / "reports" / "imported" / "report.html").exists()
        assert "0 failed" in out

        code, out, err = cli("run", "imported", "--period", "2021", "--select", "asm_change")
        assert code == 0, out + err
        assert "assets: asm_change" in out and "2021: new" in out and "2020:" not in out

        code, out, err = cli("run", "imported", "--from", "asm_change", "--period", "2021")
        assert code == 0, out + err
        assert "assets: asm_change, concession_risk, protected_area_pressure, hotspots, alerts, region_report" in out  # fmt: skip

        code, out, err = cli("run", "imported", "--select", "asm_sitez")
        assert code == 2 and "unknown asset(s) asm_sitez (known: scenes, composite" in err
        code, out, err = cli("run", "imported", "--period", "2019")
        assert code == 2 and "no period '2019'" in err


@pytest.mark.slow
def test_sql_for_analysts_formats_files_and_one_line_errors(
    demo_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad SQL: one line and exit 2, never a traceback; rows as csv, json lines or
    Parquet, to stdout or (whole or not at all) to a file; every context layer has a
    view, empty where no region has the layer (the demo has no rivers)."""
    import json

    import pyarrow.parquet as pq

    root = str(demo_run[0])
    capsys.readouterr()
    for query, words in (
        ("SELEC * FROM asm_sites", "Parser Error: syntax error"),
        ("SELECT * FROM asm_site", 'Did you mean "asm_sites'),
        ("SELECT nope FROM asm_sites", "Binder Error"),
    ):
        assert main(["sql", query, "--data", root]) == 2, query
        err = capsys.readouterr().err
        assert err.startswith("asmwatch sql: ") and words in err, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["sql", "SELECT count(*) AS n FROM rivers", "--data", root, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "0"]

    q = "SELECT site_id, period, area_ha FROM asm_sites ORDER BY site_id"
    assert main(["sql", q, "--data", root, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(lines) - 1
    assert lines[0] == "site_id,period,area_ha" and n > 50  # csv: every row, not the 50 shown
    assert main(["sql", q, "--data", root, "--format", "json", "--max-rows", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"site_id", "period", "area_ha"}
    out = tmp_path / "sites.parquet"
    assert main(["sql", q, "--data", root, "--format", "parquet", "--output", str(out)]) == 0
    assert f"wrote {n} rows to {out}" in capsys.readouterr().err
    assert pq.read_table(out).column("site_id").to_pylist() == [line.split(",")[0] for line in lines[1:]]  # fmt: skip
    csv_out = tmp_path / "sites.csv"
    assert main(["sql", q, "--data", root, "--format", "csv", "--output", str(csv_out)]) == 0
    assert csv_out.read_text().splitlines() == lines
    # A failed query leaves the earlier file as it was, and nothing half written.
    assert main(["sql", "SELECT nope FROM asm_sites", "--data", root, "--format", "csv", "--output", str(csv_out)]) == 2  # fmt: skip
    assert csv_out.read_text().splitlines() == lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sites.csv", "sites.parquet"]
    assert main(["sql", q, "--data", root, "--format", "parquet"]) == 2
    assert "--output FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_export_writes_the_demo_region_for_qgis(
    demo_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import duckdb
    import pyogrio

    root = demo_run[0]
    out = tmp_path / "demo.gpkg"
    argv = ["export", "demo-huepetuhe", "--data", str(root), "--regions", str(ROOT / "regions.yaml")]  # fmt: skip
    assert main([*argv, "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"to {out} (gpkg; EPSG:4326)" in said
    layers = {row[0] for row in pyogrio.list_layers(out)}
    assert {"asm_sites", "asm_change", "region_summary", "alerts", "concession_risk",
            "protected_areas", "concessions", "grievances"} <= layers  # fmt: skip
    con = duckdb.connect()
    for layer, folder in (("asm_sites", "sites"), ("asm_change", "change"),
                          ("region_summary", "summary"), ("alerts", "risk/alerts")):  # fmt: skip
        files = f"{root}/{folder}/demo-huepetuhe/*.parquet"
        (n,) = con.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()  # type: ignore[misc]
        assert len(pyogrio.read_dataframe(out, layer=layer, read_geometry=False)) == n, layer
    con.close()
    # One period, FlatGeobuf: a folder with a file per table.
    folder = tmp_path / "fgb"
    assert main([*argv, "--period", "2021", "--format", "fgb", "--output", str(folder)]) == 0
    assert (folder / "asm_sites.fgb").exists() and (folder / "region_summary.csv").exists()
    sites = pyogrio.read_dataframe(folder / "asm_sites.fgb")
    assert set(sites["period"]) == {"2021"}
    assert main([*argv, "--period", "1999"]) == 2
    assert "'1999'" in capsys.readouterr().err


@pytest.mark.slow
def test_report_writes_the_region_again_in_another_language(
    demo_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_run[0]
    argv = ["report", "demo-huepetuhe", "--data", str(root), "--regions", str(ROOT / "regions.yaml")]  # fmt: skip
    out = tmp_path / "es"
    assert main([*argv, "--language", "es", "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "language es (set for this run)" in said and f"wrote {out / 'report.html'}" in said
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<html lang="es">' in page and "Qué ocurrió" in page and "Métodos y límites" in page
    assert sorted(p.name for p in out.iterdir()) == ["expansion.png", "report.html", "webmap.html"]
    # The region's own reports are left as they were.
    assert '<html lang="en">' in (root / "reports" / "demo-huepetuhe" / "report.html").read_text(encoding="utf-8")  # fmt: skip
    assert main(["report", "nowhere", "--data", str(root), "--regions", str(ROOT / "regions.yaml")]) == 2  # fmt: skip
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a language asmwatch does not write
        main([*argv, "--language", "de"])
