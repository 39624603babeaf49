"""The asmwatch command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main

ROOT = Path(__file__).resolve().parent.parent


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
    err = capsys.readouterr().err
    assert "2019: FAILED; see the run" in err and "make ui" in err
