"""Tiled inference (blending arithmetic, coverage, bad arguments) and the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ml.features import IGNORE, Normalizer
from ml.infer import blend_window, even_starts, pick_device, plan_tiles, predict_tiled, tile_starts
from ml.metrics import confusion, evaluate
from ml.models import UnetSpec, build_unet, index_baseline


class PixelModel(nn.Module):
    """A per-pixel model (1x1 convolution): what it predicts cannot depend on tiling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


def test_tile_starts_cover_every_pixel() -> None:
    for size in (64, 100, 256, 257, 1000):
        starts = tile_starts(size, 64, 48)
        covered = np.zeros(max(size, 64), bool)
        for s in starts:
            covered[s : s + 64] = True
        assert covered[:size].all() and starts[-1] + 64 == max(size, 64)
    w = blend_window(64, 16)
    assert w.shape == (64, 64) and float(w.min()) > 0 and float(w[32, 32]) == 1.0


def test_even_tiles_cover_with_the_overlap_and_little_waste() -> None:
    for size in (40, 64, 100, 257, 1000, 10980):
        for tile, overlap in ((64, 16), (256, 32), (2048, 64)):
            edge, starts = even_starts(size, tile, overlap)
            assert edge % 32 == 0 and edge <= max(tile, size + 31)
            assert starts[0] == 0 and starts[-1] + edge == max(size, edge)
            steps = np.diff(starts)
            assert (steps <= edge - overlap).all(), "neighbours share at least the overlap"
            if len(starts) > 1:  # not more tiles than a fixed stride would use
                assert len(starts) <= len(tile_starts(size, tile, tile - overlap))
    # A full Sentinel-2 tile: 36 tiles of 1888 px for 2048 px tiles, 6 % extra pixels.
    plan = plan_tiles(10980, 10980, 2048, 64)
    assert (plan.tile_h, plan.n_tiles) == (1888, 36)
    assert plan.computed_pixels / 10980**2 < 1.07
    # Normalised weights sum to one on every pixel.
    for axis in (0, 1):
        total = torch.zeros(plan.padded[axis])
        starts = plan.ys if axis == 0 else plan.xs
        for s, w in zip(starts, plan.weights(axis), strict=True):
            total[s : s + w.shape[0]] += w
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_blending_is_exact_for_a_per_pixel_model() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 300, 410)).astype(np.float32)
    model = PixelModel(9).eval()
    with torch.no_grad():
        whole = torch.sigmoid(model(torch.from_numpy(x)[None]))[0, 0].numpy()
    tiled = predict_tiled(model, x, tile=128, overlap=32, batch=5, device=torch.device("cpu"))
    assert tiled.shape == (300, 410)
    assert np.abs(tiled - whole).max() < 1e-5, "weights sum back to exactly one everywhere"
    # Smaller than one tile: padded, then cropped back.
    small = predict_tiled(model, x[:, :40, :50], tile=64, overlap=16, device=torch.device("cpu"))
    assert small.shape == (40, 50) and np.abs(small - whole[:40, :50]).max() < 1e-5


def test_raw_features_are_normalised_per_tile_and_nan_stays_nan() -> None:
    """Passing the normaliser gives what normalising the whole scene first gives."""
    rng = np.random.default_rng(3)
    raw = (0.2 + 0.05 * rng.standard_normal((9, 200, 230))).astype(np.float32)
    raw[3, 50:60, 70:90] = np.nan
    norm = Normalizer(
        tuple(0.2 + 0.01 * i for i in range(9)), tuple(0.05 + 0.001 * i for i in range(9))
    )
    torch.manual_seed(0)
    model = build_unet(UnetSpec()).eval()
    cpu = torch.device("cpu")
    first = predict_tiled(model, norm.apply(raw), tile=128, overlap=32, device=cpu)
    fused = predict_tiled(model, raw, normalizer=norm, tile=128, overlap=32, device=cpu)
    hole = ~np.isfinite(raw).all(axis=0)
    assert np.isnan(fused[hole]).all() and np.isfinite(fused[~hole]).all()
    assert np.abs(fused[~hole] - first[~hole]).max() < 1e-5


def test_unet_tiles_blend_without_seams() -> None:
    """A U-Net sees padding at tile edges; blending keeps tile borders invisible."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:320, 0:320] / 40.0
    x = np.stack([np.sin(yy + i) * np.cos(xx - i) for i in range(9)]).astype(np.float32)
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    torch.manual_seed(0)
    model = build_unet(UnetSpec()).eval()
    valid = np.ones((320, 320), bool)
    valid[:10, :10] = False
    p = predict_tiled(model, x, valid=valid, tile=128, overlap=32, device=torch.device("cpu"))
    assert np.isnan(p[:10, :10]).all() and np.isfinite(p[10:, 10:]).all()
    with torch.no_grad():
        whole = torch.sigmoid(model(torch.from_numpy(x)[None]))[0, 0].numpy()
    # Jumps between neighbouring columns at tile borders are no larger than elsewhere.
    jumps = np.abs(np.diff(p[20:], axis=1)).mean(axis=0)
    plan = plan_tiles(320, 320, 128, 32)
    borders = [s - 1 for s in plan.xs[1:]] + [s + plan.tile_w - 1 for s in plan.xs[:-1]]
    assert jumps[borders].max() < 3 * np.median(jumps) + 1e-6
    assert np.nanmean(np.abs(p - whole)[20:, 20:]) < 0.05


def test_bad_arguments_are_named() -> None:
    m = PixelModel(3)
    x = np.zeros((3, 64, 64), np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        predict_tiled(m, x, tile=100)
    with pytest.raises(ValueError, match="below half the tile"):
        predict_tiled(m, x, tile=64, overlap=32)
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        predict_tiled(m, x[0], tile=64)
    with pytest.raises(ValueError, match="normaliser has 2 channels, the image 3"):
        predict_tiled(m, x, tile=64, normalizer=Normalizer((0.0, 0.0), (1.0, 1.0)))
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device("cuda")


def test_metrics_on_a_hand_count() -> None:
    prob = np.array([[0.9, 0.8, 0.2, 0.1], [0.7, 0.4, np.nan, 0.6]], np.float32)
    labels = np.array([[1, 0, 1, 0], [1, 1, 1, IGNORE]], np.uint8)
    # known: 7 pixels (NaN and IGNORE skipped): tp=2 (0.9, 0.7), fp=1 (0.8), fn=2 (0.2, 0.4), tn=1
    assert confusion(prob, labels) == (2, 1, 2, 1)
    m = evaluate(prob, labels)
    assert m["iou"] == pytest.approx(2 / 5) and m["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(4 / 7, abs=1e-4)


def test_normalizer_and_index_baseline() -> None:
    a = np.array([[[1.0, 3.0], [np.nan, 5.0]]], np.float32)
    n = Normalizer.fit([a])
    assert n.mean == pytest.approx((3.0,)) and n.std[0] > 0
    out = n.apply(a)
    assert out[0, 1, 0] == 0.0 and out[0, 0, 1] == pytest.approx(0.0)
    feats = np.zeros((9, 1, 3), np.float32)
    feats[6] = [0.85, 0.10, 0.05]  # NDVI: forest, bare, water-ish
    feats[8] = [-0.4, 0.2, -0.3]  # BSI
    p = index_baseline(feats)[0]
    assert p[1] > 0.9 > 0.1 > p[0] and p[2] < 0.5


def test_real_mining_polygons_become_labels_by_period() -> None:
    """AMW's Madre de Dios 'new mining by period' polygons, burnt onto a 100 m UTM grid:
    the labelled mining area only grows with the period, as cumulative mining should."""
    import rasterio
    from affine import Affine

    from ml.features import Scene, read_labels
    from tests.conftest import shared

    polys = shared(
        "reference/amw_mdd_polygons/amw_mdd_bbox_new_mining_by_period_2018_2025Q4.geojson"
    )
    # Huepetuhe - Delta 1 - La Pampa, EPSG:32719 at 100 m (about 60 x 45 km).
    shape = (450, 600)
    scene = Scene(
        features=np.zeros((9, *shape), np.float32),
        valid=np.ones(shape, bool),
        transform=Affine(100, 0, 300_000, 0, -100, 8_610_000),
        crs=rasterio.crs.CRS.from_epsg(32719),
    )
    areas = {}
    for period in ("2018", "2021", "2024"):
        lab = read_labels(polys, scene, period=period)
        assert set(np.unique(lab)) <= {0, 1}
        areas[period] = int(lab.sum())
    assert 0 < areas["2018"] < areas["2021"] < areas["2024"], areas
    everything = read_labels(polys, scene)
    assert everything.sum() >= areas["2024"]
