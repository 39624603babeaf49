"""Point labels (positive and negative sample locations) train the segmentation model.

On the small embedded world, 500 points sampled from the simulator's truth (250 mining,
250 not, over the two training periods, each with its period) train a U-Net, scored
against the full truth mask of the held-out year beside the same U-Net trained on the
dense truth masks (what polygons give). Issue 19 asks for 0.9 of the dense model's IoU;
with 5 x 5 windows gated by similarity and self-training from the points model's
confident pixels, measured here 0.94-0.95 for four samples of points
(docs/detection.md), so the test holds the issue's 0.9 (this sample is the first), and
the area: a balanced sample
teaches the model that half the land is mined, and without the prior correction the
mined area came out 36 % too large.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine

from ml.features import IGNORE, LabelsError, LabelSource
from ml.points import POINT_RADIUS_PX
from pipelines.embedded.source import world_dir
from pipelines.stages.detection import check_labels, train_mining_model, training_scenes
from tests.conftest import small_region
from tests.ml.conftest import SHORT

N_POINTS = 500


def sample_points(root: Path, n: int, seed: int, out: Path, balanced: bool = True) -> Path:
    """``n`` points from the truth masks of the training periods, an equal share per
    period, inside the AOI, as a GeoJSON of ``label`` and ``period`` in EPSG:4326:
    ``balanced``, half on mining (1) and half on other land (0, re-vegetating
    included); else a simple random sample of the AOI's pixels."""
    import shapely
    from pyproj import Transformer

    region = small_region()
    aoi = shapely.geometry.shape(region.geometry)
    rng = np.random.default_rng(seed)
    features: list[dict[str, Any]] = []
    train = region.periods[:-1]
    for period in train:
        with rasterio.open(world_dir(root, region) / "truth" / f"{period.id}.tif") as src:
            truth, t, crs = src.read(1), src.transform, src.crs
        to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        rows, cols = np.indices(truth.shape)
        xs, ys = t * (cols.ravel() + 0.5, rows.ravel() + 0.5)
        lon, lat = to_ll.transform(xs, ys)
        inside = shapely.contains_xy(aoi, lon, lat)
        flat = truth.ravel()
        strata = ((1,), (0, 2)) if balanced else ((0, 1, 2),)
        for values in strata:
            pool = np.flatnonzero(inside & np.isin(flat, values))
            for i in rng.choice(pool, n // (len(strata) * len(train)), replace=False):
                features.append({
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [float(lon[i]), float(lat[i])]},
                    "properties": {"label": int(flat[i] == 1), "period": period.id},
                })  # fmt: skip
    out.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return out


@pytest.mark.slow
def test_500_points_train_within_a_tenth_of_the_dense_label_model(
    root: Path, dense_model: tuple[Path, Any]
) -> None:
    dense = dense_model[1]  # the same schedule on the truth masks (the quality test's model)
    assert {k: dense.config[k] for k in SHORT.to_dict()} == SHORT.to_dict()
    points = sample_points(root, N_POINTS, seed=11, out=root / "points.geojson")
    region = dataclasses.replace(small_region(), context={"mining_labels": str(points)})
    logs: list[str] = []
    sparse = train_mining_model(root, [region], config=SHORT, progress=logs.append).record
    print("\n".join(logs))

    assert sparse.metrics["labels"] == ["points"] and dense.metrics["labels"] == ["raster"]
    assert sparse.domain["labels"] == ["points"]
    assert sparse.metrics["training_points"] > 0.6 * N_POINTS  # the rest: validation strip
    # Both are scored against the held-out year's full truth mask, not the points.
    assert sparse.metrics["heldout_scored_against"] == {"test-small/2021": "raster"}
    held = [d for d in sparse.train_data if d["role"] == "heldout"]
    assert held[0]["labels"] == "points.geojson" and held[0]["scored_against"].endswith("2021.tif")
    d_iou, s_iou = dense.metrics["heldout"]["iou"], sparse.metrics["heldout"]["iou"]
    print(f"held-out IoU: dense {d_iou:.3f}, {N_POINTS} points {s_iou:.3f} ({s_iou / d_iou:.2f})")
    assert d_iou >= 0.8, dense.metrics["heldout"]
    # 0.944 of dense with this sample on the development machine (docs/detection.md)
    assert s_iou >= 0.9 * d_iou, (sparse.metrics["heldout"], dense.metrics["heldout"])
    # One round of self-training, recorded; the logs say what it learnt from.
    (st,) = sparse.metrics["self_training"]
    assert st["round"] == 1 and st["confidence"] == 0.9 and st["threshold"] == sparse.metrics["threshold"]  # fmt: skip
    assert any("self-training round 1: a new U-Net learns from the points" in m for m in logs)
    assert dense.metrics["self_training"] is None
    assert s_iou >= sparse.metrics["baseline_heldout"]["iou"] + 0.1
    # The prior correction: half the points are mining, a few per cent of the land is.
    prior = sparse.metrics["prior"]
    assert 0.45 <= prior["training"] <= 0.6 and 0.02 <= prior["estimated"] <= 0.15, prior
    assert prior["logit_offset"] < -1.5
    held_area = sparse.metrics["heldout"]["recall"] / sparse.metrics["heldout"]["precision"]
    assert 0.8 <= held_area <= 1.25, sparse.metrics["heldout"]  # mapped / true mined area


def _points(path: Path, rows: list[tuple[float, float, Any]], **extra: list[Any]) -> Path:
    features = []
    for i, (lon, lat, label) in enumerate(rows):
        props = {} if label is ... else {"label": label}
        props.update({k: v[i] for k, v in extra.items()})
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [lon, lat]},
                "properties": props,
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


IN = [(-70.54, -12.99), (-70.535, -12.985), (-70.53, -12.98)]  # inside the small AOI


def test_points_burn_small_windows_and_leave_the_rest_unknown(tmp_path: Path) -> None:
    t = Affine(0.0001, 0, -70.55, 0, -0.0001, -12.975)  # a lon/lat grid over the AOI
    path = _points(
        tmp_path / "p.geojson",
        [
            (-70.5450, -12.9800, 1),
            (-70.5300, -12.9900, 0),
            (-70.54015, -12.98505, 1),
            (-70.54005, -12.98505, 0),
        ],
        period=["2020", "2020", "2021", "2021"],
    )
    with LabelSource(path, "EPSG:4326", "2020") as src:
        y = src.read(t, np.ones((250, 250), bool))
    k = 2 * POINT_RADIUS_PX + 1  # a k x k window per point
    assert src.kind == "points" and (y == 1).sum() == k * k and (y == 0).sum() == k * k
    r, c, w = 50, 50, POINT_RADIUS_PX  # (-70.545, -12.98): the pixel whose corner is the point
    assert (y[r - w : r + w + 1, c - w : c + w + 1] == 1).all() and y[r - w - 1, c] == IGNORE
    with LabelSource(path, "EPSG:4326", "2021") as src:  # points 1 px apart: overlap unknown
        y = src.read(t, np.ones((250, 250), bool))
    assert (y == 1).sum() == k and (y == 0).sum() == k and (y != IGNORE).sum() == 2 * k
    # AMW's composite_start / composite_end (end exclusive)
    amw = _points(
        tmp_path / "amw.geojson", [(*IN[0], 1), (*IN[1], 0)],
        composite_start=["2019-01-01", "2020-01-01"], composite_end=["2020-01-01", "2021-01-01"],
    )  # fmt: skip
    with LabelSource(amw, "EPSG:4326", "2019") as src:
        assert src.points is not None and src.points.label.tolist() == [1]
    with LabelSource(amw, "EPSG:4326", "x", dates=(_d("2019-06-01"), _d("2020-06-30"))) as src:
        assert src.points is not None and src.points.label.tolist() == [1, 0]
    with pytest.raises(LabelsError, match="neither a year nor a quarter"):
        LabelSource(amw, "EPSG:4326", "dry-season")


def test_window_pixels_unlike_their_point_are_left_unknown() -> None:
    """A point on a mine's edge labels only the window pixels that look like its own
    pixel (``gate_windows``): bare ground 1, the forest beside it unknown; likewise for a
    not-mining point beside the mine; NaN features are unknown, a point's own pixel
    always keeps its label, and points off the chip change nothing."""
    from ml.points import POINT_RADIUS_PX as r
    from ml.points import POINT_SIMILARITY, gate_windows

    assert POINT_SIMILARITY < 3.0, "the mine (3 units away) must read as unlike the forest"
    n = 9 + 2 * r + 3
    feats = np.zeros((3, n, n), np.float32)  # forest: 0 in every normalised feature
    feats[:, :, 8:] = 3.0  # a mine: columns 8.. (far beyond POINT_SIMILARITY)
    feats[:, 12, 9 + r] = np.nan
    # A: mining on the mine's western edge; B: not mining beside it; C: mining, its window
    # overlapping B's (columns 8 .. 7 + r); and one point off the chip.
    rows, cols = np.array([r + 1, 12, 12, 40]), np.array([8, 7, 8 + r, 40])
    labels = np.array([1, 0, 1, 1], np.uint8)
    hit = np.zeros((2, n, n), bool)  # as PointSet.burn: overlaps of both classes unknown
    for rr, cc, lab in zip(rows[:3], cols[:3], labels[:3], strict=True):
        hit[lab, rr - r : rr + r + 1, cc - r : cc + r + 1] = True
    y = np.full((n, n), IGNORE, np.uint8)
    y[hit[0]], y[hit[1]] = 0, 1
    y[hit[0] & hit[1]] = IGNORE
    out = gate_windows(y, feats, rows, cols, labels, IGNORE)
    a_rows = slice(1, 2 * r + 2)
    assert (out[a_rows, 8 : 9 + r] == 1).all() and (out[a_rows, 8 - r : 8] == IGNORE).all()
    # B: its forest columns stay 0, the overlap was and stays unknown
    assert (out[12 - r : 13 + r, 7 - r : 8] == 0).all() and (out[12 - r : 13 + r, 8 : 8 + r] == IGNORE).all()  # fmt: skip
    # C: mine pixels keep 1, the NaN pixel does not
    c_rest = out[12 - r : 13 + r, 8 + r : 9 + 2 * r]
    assert out[12, 8 + r] == 1 and out[12, 9 + r] == IGNORE and (c_rest == 1).sum() == c_rest.size - 1  # fmt: skip
    untouched = ~(hit[0] | hit[1])
    assert (out[untouched] == y[untouched]).all()
    # a looser similarity keeps the whole window
    loose = gate_windows(y, feats, rows, cols, labels, IGNORE, similarity=10.0)
    assert (loose[a_rows, 8 - r : 9 + r] == 1).all()


def _d(s: str) -> Any:
    import datetime as dt

    return dt.date.fromisoformat(s)


BAD: list[tuple[str, list[tuple[float, float, Any]], dict[str, list[Any]], str]] = [
    ("unknown label", [(*IN[0], 1), (*IN[1], "maybe"), (*IN[2], 0)], {}, "feature 1: unknown label value(s) 'maybe'"),
    ("label 2", [(*IN[0], 1), (*IN[1], 2)], {}, "feature 1: unknown label value(s) 2"),
    ("no label", [(*IN[0], ...), (*IN[1], ...)], {"id": [1, 2]}, "need a `label` property on every point"),
    ("no negatives", [(*IN[0], 1), (*IN[1], "mining")], {}, "2 mining and 0 not-mining points, no negative"),
    ("no positives", [(*IN[0], 0), (*IN[1], False)], {}, "0 mining and 2 not-mining points, no mining"),
    ("outside", [(*IN[0], 1), (-70.6, -12.99, 0), (*IN[1], 0), (-69.0, -12.0, 1)], {}, "2 of 4 points lie outside region 'test-small''s AOI (features 1, 3)"),
    ("bad period", [(*IN[0], 1), (*IN[1], 0)], {"period": ["2020", "20x0"]}, "feature 1: period '20x0' is not a period"),
    ("bad date", [(*IN[0], 1), (*IN[1], 0)], {"composite_start": ["2020-01-01", "soon"], "composite_end": ["2021-01-01"] * 2}, "feature 1: composite_start 'soon' is not a date"),
    ("half dates", [(*IN[0], 1), (*IN[1], 0)], {"composite_start": ["2020-01-01", "2020-01-01"], "composite_end": ["2021-01-01", ""]}, "feature 1: one of composite_start and composite_end is empty"),
    ("end first", [(*IN[0], 1), (*IN[1], 0)], {"composite_start": ["2020-01-01", "2021-01-01"], "composite_end": ["2021-01-01", "2020-06-01"]}, "feature 1: composite_end is not after composite_start"),
    ("none in training", [(*IN[0], 1), (*IN[1], 0)], {"period": ["2021", "2021"]}, "in the training periods (2019, 2020) it has 0 mining and 0 not-mining"),
]  # fmt: skip


@pytest.mark.parametrize("rows, extra, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_point_label_files_name_the_file_and_features(
    tmp_path: Path, rows: list[tuple[float, float, Any]], extra: dict[str, list[Any]], message: str
) -> None:
    path = _points(tmp_path / "labels.geojson", rows, **extra)
    with pytest.raises(LabelsError) as e:
        check_labels(path, small_region())
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_a_mix_of_points_and_polygons_is_refused_before_training(tmp_path: Path) -> None:
    path = tmp_path / "mixed.geojson"
    square = [[[-70.54, -12.99], [-70.53, -12.99], [-70.53, -12.98], [-70.54, -12.99]]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": list(IN[0])}, "properties": {"label": 1}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}, "properties": {"label": 1}},
    ]}))  # fmt: skip
    region = dataclasses.replace(small_region(), context={"mining_labels": str(path)})
    for period in region.periods:  # composites exist: the labels are what is wrong
        p = tmp_path / "composite" / region.id / f"{period.id}.tif"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    with pytest.raises(LabelsError, match=r"mixes points \(feature 0\) and polygons \(feature 1\)"):
        training_scenes(tmp_path, [region])


def test_amazon_mining_watchs_sampling_points_are_read_as_published() -> None:
    """The real AMW sampling points of the Madre de Dios box: labels 0/1, AMW's
    composite_start/composite_end (some empty: always), checked and read per year; AMW's
    positives-only file is refused for want of negatives."""
    import datetime as dt

    from pipelines.regions import Period
    from tests.conftest import shared

    path = shared("reference/amw_labels/amw_sampling_points_mdd_bbox.geojson")
    x0, y0, x1, y1 = (-72.6, -13.6, -68.5, -9.8)  # PROVENANCE.md's MDD box
    box = [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]
    years = tuple(Period(str(y), dt.date(y, 1, 1), dt.date(y, 12, 31)) for y in (2023, 2024, 2025))
    mdd = dataclasses.replace(
        small_region(), id="mdd", bbox=(x0, y0, x1, y1), periods=years,
        geometry={"type": "Polygon", "coordinates": box}, source="earth-search",
    )  # fmt: skip
    check_labels(path, mdd)
    counts = {}
    for year in years:
        with LabelSource(path, "EPSG:32719", year.id) as src:
            assert src.kind == "points" and src.points is not None
            counts[year.id] = (len(src.points), int(src.points.label.sum()))
    # 531 undated positives hold every year; the dated ones only in their own.
    assert counts == {"2023": (1234, 1102), "2024": (860, 665), "2025": (1092, 628)}

    positives = shared("labels/mining-detector/MinesPos2018-2020Sentinel_points.geojson")
    with pytest.raises(LabelsError, match="point labels need a `label` property"):
        check_labels(positives, mdd)
