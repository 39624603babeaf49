"""`mining_model` and `mining_probability` materialised in-process after the composites."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from assets.composite import composite
from assets.detection import asm_sites, mining_model, mining_probability
from assets.partitions import BACKFILL_WAIT_RETRIES, partition_key
from assets.resources import TorchResource
from assets.scenes import scenes
from tests.assets.test_composite_asset import _meta, _regions_file, _resources
from tests.conftest import materialize


@pytest.mark.slow
def test_model_then_probability(tmp_path: Path) -> None:
    regions = _regions_file(tmp_path)
    res = {
        **_resources(tmp_path, regions),
        "torch_device": TorchResource(device="cpu", tile=128, overlap=16),
    }
    for period in ("2019", "2020"):
        key = partition_key("demo-huepetuhe", period)
        assert materialize([scenes, composite], partition_key=key, resources=res).success

    key = partition_key("demo-huepetuhe", "2020")
    before = materialize([mining_probability], partition_key=key, resources=res)
    assert before.success and _meta(before, "mining_probability")["detector"] == "index-baseline"
    assert "no model is registered" in str(_meta(before, "mining_probability")["model_choice"])

    tiny = {"chip": 64, "batch": 4, "steps_per_epoch": 2, "max_epochs": 2, "patience": 2}
    run_config = {"ops": {"mining_model": {"config": tiny}}}
    trained = materialize([mining_model], resources=res, run_config=run_config)
    assert trained.success
    m = _meta(trained, "mining_model")
    assert m["reused"] is False and m["device"] == "cpu" and m["epochs"] == 2
    assert 0 <= m["heldout_iou"] <= 1 and 0 <= m["baseline_heldout_iou"] <= 1  # type: ignore[operator]
    assert [d["role"] for d in m["train_data"]] == ["train", "heldout"]  # type: ignore[union-attr]
    assert Path(str(m["path"])).exists()

    again = materialize([mining_model], resources=res, run_config=run_config)
    assert _meta(again, "mining_model")["reused"] is True
    assert _meta(again, "mining_model")["model_id"] == m["model_id"]

    after = materialize([mining_probability], partition_key=key, resources=res)
    p = _meta(after, "mining_probability")
    assert p["detector"] == m["model_id"] and p["device"] == "cpu"
    assert (
        str(p["model_choice"]).startswith("trained on this region")
        and p["model_domain"]["imagery"] == "embedded"
    )  # type: ignore[index]
    # A real region (Earth Search, Peru) with only this simulated model: refused before any
    # work, saying how to train one or choose.
    import yaml

    doc = yaml.safe_load(regions.read_text())
    doc["regions"].append({"id": "mdd-real", "aoi": {"bbox": [-70.55, -13.0, -70.525, -12.975]}, "periods": [2020], "country": "PE"})  # fmt: skip
    regions.write_text(yaml.safe_dump(doc))
    real = materialize([mining_probability], partition_key=partition_key("mdd-real", "2020"), resources={**_resources(tmp_path, regions), "torch_device": TorchResource(device="cpu")}, raise_on_error=False)  # fmt: skip
    failures = [e.step_failure_data for e in real.all_events if e.is_step_failure]
    assert not real.success and failures
    said = str(failures[0].user_failure_data.description if failures[0].user_failure_data else failures[0].error)  # fmt: skip
    assert "will not apply a model trained on simulated scenes" in said and "`model: none`" in said, said  # fmt: skip
    assert (
        "truth_iou" in p
        and (tmp_path / "data" / "probability" / "demo-huepetuhe" / "2020.tif").exists()
    )

    sites = materialize([asm_sites], partition_key=key, resources=res)
    s = _meta(sites, "asm_sites")
    assert sites.success and s["settings"] == {"mmu_ha": 0.5}
    assert (tmp_path / "data" / "sites" / "demo-huepetuhe" / "2020.parquet").exists()
    assert isinstance(s["site_count"], int) and isinstance(s["total_area_ha"], float)


def test_imported_detections_become_sites_without_a_model(tmp_path: Path) -> None:
    """A region with `detections` needs no composite or model: asm_sites reads the file."""
    import geopandas as gpd
    import shapely.geometry
    import yaml

    from pipelines.stages.catalog import connect

    squares = [shapely.geometry.box(-70.54 + 0.004 * i, -12.99, -70.537 + 0.004 * i, -12.987) for i in range(3)]  # fmt: skip
    squares.append(shapely.geometry.box(-70.6, -12.99, -70.597, -12.987))  # outside the AOI
    det = gpd.GeoDataFrame(
        {"period": ["2019", "2020", "2020", "2020"], "ha": [1.0, 2.0, 3.0, 4.0]},
        geometry=squares,
        crs=4326,
    )
    det.to_file(tmp_path / "external.geojson")
    regions = _regions_file(tmp_path)
    doc = yaml.safe_load(regions.read_text())
    doc["regions"][0]["detections"] = {
        "file": "external.geojson", "mapped_area_field": "ha", "mode": "new",
    }  # fmt: skip
    regions.write_text(yaml.safe_dump(doc))
    res = _resources(tmp_path, regions)
    key = partition_key("demo-huepetuhe", "2020")
    result = materialize([asm_sites], partition_key=key, resources=res)
    meta = _meta(result, "asm_sites")
    assert result.success and meta["site_count"] == 3  # 2019's and 2020's, not the outsider
    assert meta["mapped_area_ha"] == 6.0 and str(meta["source"]).startswith("imported:")
    con = connect(tmp_path / "data" / "asmwatch.duckdb", read_only=True)
    rows = con.execute(
        "SELECT first_seen_period, count(*), sum(mapped_area_ha), sum(area_ha) FROM asm_sites "
        "WHERE region = ? AND period = ? GROUP BY 1 ORDER BY 1",
        ["demo-huepetuhe", "2020"],
    ).fetchall()
    con.close()
    assert [r[:3] for r in rows] == [("2019", 1, 1.0), ("2020", 2, 5.0)]
    assert rows[1][3] == pytest.approx(2 * 0.003**2 * 111.32**2 * 0.974 * 100, rel=0.03)

    # A broken file fails the run with the file named; the sites written before stay.
    (tmp_path / "external.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    before = (tmp_path / "data" / "sites" / "demo-huepetuhe" / "2020.parquet").read_bytes()
    failed = materialize([asm_sites], partition_key=key, resources=res, raise_on_error=False)
    assert not failed.success
    assert "external.geojson has no features" in str(
        failed.get_step_failure_events()[0].event_specific_data.error
    )  # type: ignore[union-attr]
    assert (tmp_path / "data" / "sites" / "demo-huepetuhe" / "2020.parquet").read_bytes() == before


def test_change_and_region_summary_from_imported_detections(tmp_path: Path) -> None:
    """asm_change per period in order, then the region_summary view; out of order fails."""
    import geopandas as gpd
    import shapely.geometry
    import yaml

    from assets.change import asm_change
    from pipelines.stages.catalog import connect

    def sq(x: float, d: float) -> shapely.geometry.Polygon:
        return shapely.geometry.box(-70.545 + x, -12.995, -70.545 + x + d, -12.995 + d)

    det = gpd.GeoDataFrame(
        {"period": ["2019", "2019", "2020", "2020"]},
        # 2019: two sites; 2020: the first grown to twice its width, the second gone.
        geometry=[
            sq(0, 0.002),
            sq(0.01, 0.002),
            sq(0, 0.002).union(sq(0.002, 0.002)),
            sq(0.005, 0.001),
        ],
        crs=4326,
    )
    det.to_file(tmp_path / "external.geojson")
    regions = _regions_file(tmp_path)
    doc = yaml.safe_load(regions.read_text())
    doc["regions"][0]["detections"] = {"file": "external.geojson"}
    regions.write_text(yaml.safe_dump(doc))
    res = _resources(tmp_path, regions)
    k2019, k2020 = (partition_key("demo-huepetuhe", p) for p in ("2019", "2020"))
    assert materialize([asm_sites], partition_key=k2020, resources=res).success
    early = materialize([asm_change], partition_key=k2020, resources=res, raise_on_error=False)
    assert not early.success
    error = str(early.get_step_failure_events()[0].event_specific_data.error)  # type: ignore[union-attr]
    assert "previous period, 2019, whose sites are missing" in error
    assert len([e for e in early.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]) == 0
    # Inside a backfill the previous period may still be running: the step waits and
    # tries again (here 0 s apart) before failing with the same message.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASMWATCH_BACKFILL_WAIT_S", "0")
        waited = materialize(
            [asm_change], partition_key=k2020, resources=res, raise_on_error=False,
            tags={"dagster/backfill": "testbf"},
        )  # fmt: skip
    assert not waited.success
    retries = [e for e in waited.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == BACKFILL_WAIT_RETRIES
    for key in (k2019, k2020):
        assert materialize([asm_sites, asm_change], partition_key=key, resources=res).success
    con = connect(tmp_path / "data" / "asmwatch.duckdb", read_only=True)
    summary = con.execute(
        "SELECT period, mining_ha, new_ha, expanded_ha, stable_ha, abandoned_ha, "
        "revegetating_ha, growth_vs_previous, growth_vs_first FROM region_summary "
        "WHERE region = ? ORDER BY period_start",
        ["demo-huepetuhe"],
    ).fetchall()
    kinds = con.execute(
        "SELECT kind, count(*) FROM asm_change WHERE period = '2020' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    con.close()
    (y19, m19, n19, *_), (y20, m20, n20, e20, s20, a20, r20, g20, f20) = summary
    cell = 0.002 * 111_320 * math.cos(math.radians(13)) * 0.002 * 110_600 / 1e4  # 4.8 ha
    assert (y19, y20) == ("2019", "2020")
    assert m19 == pytest.approx(2 * cell, rel=0.03) and n19 == pytest.approx(m19, rel=1e-4)
    # 2020: one old cell stable, one added (expanded), the small square new, one gone
    # (no composite here: abandoned, not assessed for re-vegetation).
    assert s20 == pytest.approx(cell, rel=0.03) and e20 == pytest.approx(cell, rel=0.03)
    assert n20 == pytest.approx(cell / 4, rel=0.03) and a20 == pytest.approx(cell, rel=0.03)
    assert r20 == 0 and g20 == pytest.approx(m20 / m19, abs=1e-4) and f20 == pytest.approx(g20)
    assert kinds == [("abandoned", 1), ("expanded", 1), ("new", 1), ("stable", 1)]
