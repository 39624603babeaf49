"""The simulator's strip machinery: exact order statistics, strip-invariant noise, capped
distances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipelines.embedded.simulator.landscape import _distance, _line_pixels
from pipelines.embedded.simulator.strips import (
    Scratch,
    Strips,
    median_of_counts,
    nth_set_pixel,
    order_stats,
    quantile,
    quantile_of_counts,
)


@pytest.mark.parametrize("seed", range(6))
def test_order_stats_and_quantiles_are_numpys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 50_000))
    a = (rng.standard_normal(n) * rng.uniform(0.01, 300)).astype(np.float32)
    if seed % 2:
        a[: n // 3] = np.float32(2.5)  # many ties, one crowded key bucket
    parts = np.array_split(a, int(rng.integers(1, 9)))
    ks = sorted({int(k) for k in rng.integers(0, n, 7)} | {0, n - 1})
    got, count = order_stats(lambda: iter(parts), ks)
    assert count == n and got == [np.sort(a)[k] for k in ks]
    for q in (0.0, 0.2, float(rng.uniform()), 0.98, 1.0):
        want = np.quantile(a, q)
        have = quantile(lambda: iter(parts), n, q)
        assert have == want and type(have) is type(want)
    ints = rng.integers(0, 400, n)
    counts = np.bincount(ints, minlength=400)
    assert quantile_of_counts(counts, 0.2) == np.quantile(ints, 0.2)
    assert median_of_counts(counts) == float(np.median(ints))
    with pytest.raises(ValueError, match="rank out of range"):
        order_stats(lambda: iter(parts), [n])


def test_nth_set_pixel_is_nonzeros_order() -> None:
    rng = np.random.default_rng(3)
    mask = rng.uniform(size=(40, 33)) < 0.1
    rows, cols = np.nonzero(mask)
    for j in (0, 7, rows.size - 1):
        assert nth_set_pixel(mask.sum(axis=1), j, lambda r: mask[r]) == (rows[j], cols[j])


def _noise(tmp: Path, shape: tuple[int, int], rows: int, sigma: float) -> np.ndarray:
    scratch = Scratch(tmp, Strips(*shape, rows))
    return scratch.smooth_noise(np.random.default_rng(11), sigma).read()


@pytest.mark.parametrize("sigma", [2.2, 22])
def test_smooth_noise_does_not_depend_on_the_strips(tmp_path: Path, sigma: float) -> None:
    shape = (300, 130)
    whole = _noise(tmp_path / "a", shape, 300, sigma)  # one strip: the whole-array formula
    rng = np.random.default_rng(11)
    z = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    z -= z.mean()
    assert np.array_equal(whole, (z / z.std()).astype(np.float32))
    six = _noise(tmp_path / "b", shape, 6, sigma)
    forty_two = _noise(tmp_path / "c", shape, 42, sigma)
    assert np.array_equal(six, forty_two)  # bit for bit, whatever the strip height
    np.testing.assert_allclose(six, whole, rtol=0, atol=1e-6)
    assert not list((tmp_path / "b").glob("*white*"))  # intermediate files are deleted


def test_capped_distance_is_exact_below_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.embedded.simulator import landscape

    monkeypatch.setattr(landscape, "DISTANCE_BLOCK", 16)  # several column blocks
    shape = (400, 90)
    rng = np.random.default_rng(2)
    cols = np.linspace(0, shape[1] - 1, 300)
    px = _line_pixels(shape, 200 + 30 * np.sin(cols / 9) + rng.normal(0, 2, cols.size), cols)
    mask = np.ones(shape, bool)
    mask[px[0], px[1]] = False
    exact = ndimage.distance_transform_edt(mask).astype(np.float32)
    assert np.array_equal(_distance(px, shape, 0, shape[0], None), exact)
    for cap in (10, 64):
        got = np.concatenate(
            [_distance(px, shape, r, min(r + 48, 400), cap) for r in range(0, 400, 48)]
        )
        assert np.array_equal(got, np.minimum(exact, cap))
