"""Training, the registry and probability maps on the small embedded world (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from ml import registry
from ml.train import TrainConfig
from pipelines.stages.catalog import connect, refresh_views
from pipelines.stages.detection import (
    DetectionError,
    map_probability,
    train_mining_model,
    training_scenes,
)
from tests.conftest import small_region

TINY = TrainConfig(chip=64, batch=4, steps_per_epoch=2, max_epochs=2, patience=2, seed=3)


def test_model_is_registered_reused_and_reloaded(root: Path) -> None:
    region = small_region()
    first = train_mining_model(root, [region], config=TINY, progress=lambda _m: None)
    rec = first.record
    assert not first.reused and (root / rec.path).exists() and rec.device == "cpu"
    assert rec.path == f"models/{rec.model_id}/model.pt"  # relative: the root can move
    assert {d["role"] for d in rec.train_data} == {"train", "heldout"}
    assert [d["period"] for d in rec.train_data if d["role"] == "heldout"] == ["2021"]
    assert set(rec.metrics) >= {"heldout", "baseline_heldout", "validation", "epochs"}
    assert rec.metrics["epochs"] == 2 and rec.seconds > 0

    again = train_mining_model(root, [region], config=TINY, progress=lambda _m: None)
    assert again.reused and again.record.model_id == rec.model_id
    other = train_mining_model(
        root, [region], config=TrainConfig(**{**TINY.__dict__, "seed": 4}), progress=lambda _m: None
    )
    assert not other.reused and other.record.model_id != rec.model_id, "new inputs, new model"
    latest = registry.latest(root)
    assert latest is not None and latest.model_id == other.record.model_id

    refresh_views(root)
    con = connect(root / "asmwatch.duckdb", read_only=True)
    rows = con.execute(
        "SELECT model_id, heldout_iou, device FROM models ORDER BY created_at"
    ).fetchall()
    con.close()
    assert {r[0] for r in rows} == {rec.model_id, other.record.model_id}
    assert all(0 <= r[1] <= 1 and r[2] == "cpu" for r in rows)

    # The reloaded checkpoint predicts what the registered model predicted.
    # Same tiling as the held-out evaluation in training, so the same numbers.
    res = map_probability(root, region, "2021", record=rec, progress=lambda _m: None)
    assert res.threshold == rec.metrics["threshold"] and 0.2 <= res.threshold <= 0.8
    assert res.metrics is not None and res.metrics["iou"] == pytest.approx(
        rec.metrics["heldout"]["iou"], abs=1e-3
    )
    with rasterio.open(res.path) as src:
        p = src.read(1)
        assert src.tags()["asmwatch_detector"] == rec.model_id
        assert src.dtypes[0] == "float32" and src.descriptions == ("mining_probability",)
    assert np.nanmin(p) >= 0 and np.nanmax(p) <= 1


def test_without_a_model_the_index_baseline_maps_probability(root: Path) -> None:
    region = small_region()
    res = map_probability(root, region, "2020", record=None, progress=lambda _m: None)
    assert res.detector == "index-baseline" and res.metrics is not None
    assert 0.3 < res.metrics["iou"] < 0.95 and res.mining_ha > 0
    with pytest.raises(DetectionError, match="materialise `composite`"):
        map_probability(root, region, "2018", record=None)


def test_training_names_missing_inputs(root: Path) -> None:
    region = small_region()
    (root / "composite" / region.id / "2020.tif").unlink()
    with pytest.raises(DetectionError, match=r"test-small/2020: materialise `composite`"):
        training_scenes(root, [region])
    import dataclasses

    with pytest.raises(DetectionError, match="no labelled training data"):
        training_scenes(root, [dataclasses.replace(region, source="earth-search")])


@pytest.mark.slow
def test_unet_beats_the_index_baseline_on_the_held_out_period(
    dense_model: tuple[Path, Any],
) -> None:
    """Quality: held-out IoU >= 0.8 against the simulator's truth, above the baseline
    (the session's U-Net of the short training, ``SHORT``, on the dense truth masks)."""
    root, record = dense_model
    h, b = record.metrics["heldout"], record.metrics["baseline_heldout"]
    assert h["iou"] >= 0.8, h
    assert h["iou"] > b["iou"] + 0.05, (h, b)

    # Through sites and change: area per period within 10 % of the truth, growth within 0.1.
    import geopandas as gpd

    from pipelines.infra.layout import sites_path
    from pipelines.stages.change import detect_change, summarise
    from pipelines.stages.sites import extract_sites, write_sites

    region = small_region()
    previous, history, first, truth = None, None, None, {}
    for period in ("2019", "2020", "2021"):
        res = map_probability(root, region, period, record=record, progress=lambda _m: None)
        assert res.truth_ha is not None
        truth[period] = res.truth_ha
        sites = extract_sites(res.path, region.id, period)
        write_sites(sites, sites_path(root, region.id, period))
        sites = gpd.read_parquet(sites_path(root, region.id, period))
        change = detect_change(region, period, sites, previous, previous_change=history)
        first = first or (period, change.summary["mining_ha"])
        summary = summarise(
            change.summary, None if previous is None else float(previous["area_ha"].sum()), first
        )
        print(period, summary["mining_ha"], res.truth_ha, summary["growth_vs_first"])
        assert summary["mining_ha"] == pytest.approx(res.truth_ha, rel=0.10), period
        previous, history = sites, change.frame
    true_growth = truth["2021"] / truth["2019"]
    assert summary["growth_vs_first"] == pytest.approx(true_growth, abs=0.1)


def test_real_regions_train_on_their_mining_label_polygons(tmp_path: Path) -> None:
    import dataclasses

    labels = tmp_path / "mdd_mining.geojson"
    square = [[[-70.54, -12.99], [-70.53, -12.99], [-70.53, -12.98], [-70.54, -12.99]]]
    labels.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
        f'"geometry": {{"type": "Polygon", "coordinates": {square}}}}}]}}'
    )
    region = dataclasses.replace(
        small_region(), id="mdd", source="earth-search", context={"mining_labels": str(labels)}
    )
    for period in region.periods:
        p = tmp_path / "composite" / "mdd" / f"{period.id}.tif"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    scenes = training_scenes(tmp_path, [region])
    assert [(s.period, s.heldout) for s in scenes] == [
        ("2019", False),
        ("2020", False),
        ("2021", True),
    ]
    assert {s.labels for s in scenes} == {labels}
