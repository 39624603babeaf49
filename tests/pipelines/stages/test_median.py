"""The masked median kernels: exact against numpy's nanmedian, on every edge case."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from pipelines.stages.composite.median import (
    masked_median_dn,
    masked_median_float,
    median_network,
    sorting_network,
)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_sorting_network_sorts_every_zero_one_input(n: int) -> None:
    # The 0-1 principle: a comparator network that sorts all 2^n binary inputs sorts all.
    pairs = sorting_network(n)
    for bits in itertools.product((0, 1), repeat=n):
        v = list(bits)
        for a, b in pairs:
            if v[a] > v[b]:
                v[a], v[b] = v[b], v[a]
        assert v == sorted(bits), (n, bits)


def test_median_network_is_smaller_and_still_exact_on_the_lower_half() -> None:
    rng = np.random.default_rng(3)
    for n in (4, 7, 20, 33):
        assert len(median_network(n)) <= len(sorting_network(n))
        x = rng.integers(0, 100, (n, 500))
        y = x.copy()
        for a, b in median_network(n):
            lo = np.minimum(y[a], y[b])
            y[b] = np.maximum(y[a], y[b])
            y[a] = lo
        assert (y[: n // 2 + 1] == np.sort(x, axis=0)[: n // 2 + 1]).all()
    assert len(median_network(20)) < len(sorting_network(20))
    with pytest.raises(ValueError, match="size must be >= 1"):
        sorting_network(0)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 9, 20, 33])
def test_masked_median_matches_nanmedian(t: int) -> None:
    rng = np.random.default_rng(t)
    dn = rng.integers(0, 12000, (t, 37, 41), dtype=np.uint16)  # zeros are nodata
    clear = rng.random(dn.shape) > 0.35
    med, count = masked_median_dn(dn, clear)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        ref = np.nanmedian(np.where(clear & (dn > 0), dn.astype(np.float64), np.nan), axis=0)
    assert np.allclose(med, ref, equal_nan=True, rtol=0, atol=1e-3)
    assert (count == (clear & (dn > 0)).sum(0)).all()
    assert np.isnan(med[count == 0]).all()
    fmed, fcount = masked_median_float(dn.astype(np.float32), clear & (dn > 0))
    assert np.allclose(fmed, ref, equal_nan=True, atol=1e-3) and (fcount == count).all()


def test_shifts_put_scenes_on_one_offset() -> None:
    # Scene 0 has offset 0 (baseline 02.xx), scenes 1-2 offset -0.1 (04.00+): reflectance
    # 0.05 is DN 500 in the first and DN 1500 in the others.
    dn = np.array([[[500]], [[1500]], [[1700]]], dtype=np.uint16)
    clear = np.ones_like(dn, dtype=bool)
    # Onto the lowest offset (-0.1): the old scene's DN gain +1000.
    med, _ = masked_median_dn(dn, clear, shift=[1000, 0, 0])
    assert med[0, 0] * 1e-4 - 0.1 == pytest.approx(0.05)  # median of 0.05, 0.05, 0.07
    with pytest.raises(OverflowError):
        masked_median_dn(np.full((2, 1, 1), 65000, np.uint16), np.ones((2, 1, 1), bool), [1000, 0])


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"must be equal \(t, y, x\) shapes"):
        masked_median_dn(np.zeros((2, 3, 3), np.uint16), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match=r"must be equal \(t, y, x\) shapes"):
        masked_median_float(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool))


def test_strips_change_nothing_but_the_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.stages.composite import median

    rng = np.random.default_rng(7)
    dn = rng.integers(0, 12000, (20, 70, 45), dtype=np.uint16)  # 32 + 32 + 6 rows
    clear = rng.random(dn.shape) > 0.3
    shift = rng.integers(0, 3000, 20)
    monkeypatch.setattr(median, "STRIP_ROWS", 1000)
    whole = masked_median_dn(dn, clear, shift)
    monkeypatch.setattr(median, "STRIP_ROWS", 32)
    strips = masked_median_dn(dn, clear, shift)
    assert np.array_equal(whole[0], strips[0], equal_nan=True)
    assert np.array_equal(whole[1], strips[1])
    valid = clear & (dn > 0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(np.where(valid, dn + shift[:, None, None], np.nan), axis=0)
    assert np.allclose(strips[0], ref, equal_nan=True, rtol=0, atol=1e-3)
    # A shifted DN out of range in the last strip alone still fails; a masked one never.
    dn[3, 69, 0], clear[3, 69, 0] = 64000, True
    with pytest.raises(OverflowError):
        masked_median_dn(dn, clear, shift + 2000)
    clear[3, 69, 0] = False
    assert np.isfinite(masked_median_dn(dn, clear, np.full(20, 1))[0]).any()
