"""The landscape of the embedded world: land cover per period, with mining that spreads.

A seeded, textured Madre de Dios-like landscape on a 10 m UTM window: rainforest cut by
a meandering turbid river and a tributary, a highway with settlements and pasture along
it, and gold mining (bare sediment and ponds) that spreads out from the rivers period by
period. The first period's westernmost workings are abandoned and re-vegetate. Mining
area grows geometrically so that the last period holds ``growth_factor`` times the
first period's active mining (Madre de Dios grew about 1.5x from 2019 to 2021).

The landscape is built strip by strip (``pipelines.embedded.simulator.strips``): its fields live
on disk in a scratch folder and are read back by rows, so a world of any size is built
in bounded memory. Distances to the river and the road come from a distance transform
of the strip plus a halo; beyond the halo the distance is capped, which is exact for
every use (the cap is checked to lie beyond every mining threshold, else the halo
doubles).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipelines.embedded.simulator.strips import (
    STRIP_PX,
    Field,
    Scratch,
    Strips,
    median_of_counts,
    order_stats,
    quantile_of_counts,
)


class Cover(IntEnum):
    FOREST = 1
    RIVER = 2
    SEDIMENT = 3  # bare mining sediment (tailings, sand, gravel)
    POND = 4  # mining ponds
    REGROWTH = 5  # secondary regrowth on abandoned mining land
    PASTURE = 6
    ROAD = 7
    SETTLEMENT = 8


MINING_COVERS = (Cover.SEDIMENT, Cover.POND)
INITIAL_MINING_FRACTION = 0.07  # share of the window mined in the first period
REVEGETATING_SHARE = 0.2  # share of first-period mining that is abandoned afterwards


@dataclass
class Landscape:
    """Land cover per period plus the fixed texture of the world, on disk by rows.

    Read a band of rows with :meth:`cover`, :meth:`mining`, :meth:`revegetating` (all
    rows when ``r1`` is None: only for small worlds and tests). ``close()`` removes the
    scratch folder when the landscape made its own.
    """

    shape: tuple[int, int]
    strips: Strips
    covers: list[Field]  # uint8 Cover per period
    texture: Field  # float32, mean 0, canopy/soil texture
    fine: Field  # float32, pixel-scale texture
    regrowth_age: list[int]  # periods since abandonment (0 in the first period)
    settlement_centres: list[tuple[int, int]]  # (row, col)
    mining_rows: list[np.ndarray]  # active mining pixels per row, per period
    mining_cols: np.ndarray  # active mining pixels per column in the last period
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def cover(self, period: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
        return self.covers[period].read(r0, r1)

    def mining(self, period: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Active mining (the truth mask)."""
        return np.isin(self.cover(period, r0, r1), MINING_COVERS)

    def revegetating(self, period: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Abandoned mining land re-vegetating."""
        return self.cover(period, r0, r1) == Cover.REGROWTH

    def mining_pixels(self, period: int) -> int:
        return int(self.mining_rows[period].sum())

    def mining_centre(self) -> tuple[float, float] | None:
        """Median row and column of the last period's mining (None without mining)."""
        if not self.mining_cols.sum():
            return None
        return median_of_counts(self.mining_rows[-1]), median_of_counts(self.mining_cols)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Landscape:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line_pixels(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The pixels a polyline's samples fall in, (2, n) rows and columns in row-major order
    (what ``np.nonzero`` of the line's mask gives)."""
    h, w = shape
    r = np.clip(np.round(rows).astype(int), 0, h - 1)
    c = np.clip(np.round(cols).astype(int), 0, w - 1)
    flat = np.unique(r.astype(np.int64) * w + c)
    return np.stack([flat // w, flat % w])


def _union(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    flat = np.union1d(a[0] * width + a[1], b[0] * width + b[1])
    return np.stack([flat // width, flat % width])


def _mask_rows(pixels: np.ndarray, shape: tuple[int, int], a0: int, a1: int) -> np.ndarray:
    """The line's mask over rows ``a0:a1`` (True off the line, as the distance wants)."""
    lo, hi = np.searchsorted(pixels[0], [a0, a1])
    m = np.ones((a1 - a0, shape[1]), dtype=bool)
    m[pixels[0, lo:hi] - a0, pixels[1, lo:hi]] = False
    return m


def _distance(
    pixels: np.ndarray, shape: tuple[int, int], r0: int, r1: int, cap: int | None
) -> np.ndarray:
    """Euclidean distance (px, float32) from rows ``r0:r1`` to the nearest line pixel.

    ``cap=None`` (a one-strip world): the whole-array distance transform. Else the
    transform of blocks of ``DISTANCE_BLOCK`` columns of the strip, each with ``cap``
    rows and columns around it, capped at ``cap``: exact below the cap, since a line
    pixel nearer than ``cap`` lies inside the block's window.
    """
    h, w = shape
    if cap is None:
        return ndimage.distance_transform_edt(_mask_rows(pixels, shape, 0, h)).astype(np.float32)
    a0, a1 = max(r0 - cap, 0), min(r1 + cap, h)
    rows = _mask_rows(pixels, shape, a0, a1)
    out = np.empty((r1 - r0, w), dtype=np.float32)
    for c0 in range(0, w, DISTANCE_BLOCK):
        c1 = min(c0 + DISTANCE_BLOCK, w)
        b0, b1 = max(c0 - cap, 0), min(c1 + cap, w)
        m = rows[:, b0:b1]
        if m.all():
            out[:, c0:c1] = cap
            continue
        d = ndimage.distance_transform_edt(m)[r0 - a0 : r1 - a0, c0 - b0 : c1 - b0]
        out[:, c0:c1] = np.minimum(d, cap)
    return out


def _meander(
    rng: np.random.Generator, n: int, start: float, amp: float, wavelength: float
) -> np.ndarray:
    t = np.arange(n, dtype=float)
    walk = ndimage.gaussian_filter1d(np.cumsum(rng.standard_normal(n)), 12)
    phase = rng.uniform(0, 2 * np.pi)
    return start + amp * np.sin(2 * np.pi * t / wavelength + phase) + 1.5 * walk


DISTANCE_BLOCK = 1024  # columns per distance-transform block (with ``cap`` around it)
ROAD_REACH = 70  # px: pasture lies within this distance of the highway
POTENTIAL_NOISE = 18.0  # px of distance the mining potential's noise is worth


def build_landscape(
    seed: int,
    shape: tuple[int, int],
    n_periods: int,
    growth_factor: float,
    scratch: Path | None = None,
    strip_px: int = STRIP_PX,
) -> Landscape:
    """Land cover for each of ``n_periods`` periods on a window of ``shape`` pixels.

    The fields are written under ``scratch`` (a temporary folder, removed by
    ``Landscape.close()``, when None).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    strips = Strips.for_shape(shape, strip_px)
    tmp = None
    if scratch is None:
        tmp = tempfile.TemporaryDirectory(prefix="asmwatch-landscape-")
        scratch = Path(tmp.name)
    s = Scratch(scratch, strips)

    # Main river: west to east across the middle, meandering; a tributary from the north.
    cols = np.linspace(0, w - 1, w * 3)
    main_rows = _meander(rng, cols.size, start=h * 0.55, amp=h * 0.08, wavelength=cols.size / 1.7)
    main = _line_pixels(shape, main_rows, cols)
    trib_rows = np.linspace(0, h * 0.5, h * 3)
    trib_cols = _meander(
        rng, trib_rows.size, start=w * 0.62, amp=w * 0.05, wavelength=trib_rows.size
    )
    # End the tributary where it meets the main river (above its column's first pixel).
    trib = _line_pixels(shape, trib_rows, trib_cols)
    first = np.full(w, h, dtype=np.int64)
    np.minimum.at(first, main[1], main[0])
    trib = trib[:, trib[0] < first[trib[1]]]
    river_centre = _union(main, trib, w)
    width_var = s.smooth_noise(rng, 20)  # river about 50-90 m wide

    # Highway: a straight line across the north with a slight slope.
    r0, r1 = h * rng.uniform(0.12, 0.2), h * rng.uniform(0.22, 0.3)
    road_cols = np.linspace(0, w - 1, w * 2)
    road_centre = _line_pixels(shape, np.linspace(r0, r1, road_cols.size), road_cols)

    # Settlements: clusters along the highway.
    settlements: list[tuple[int, int]] = []
    rr, cc = road_centre
    order = np.argsort(cc)
    for frac in (0.18, 0.55, 0.86):
        i = order[int(frac * (order.size - 1))]
        settlements.append((int(rr[i]), int(cc[i])))
    blob = s.smooth_noise(rng, 3)
    field_noise = s.smooth_noise(rng, 8)  # pasture: fields cut from the forest
    texture = s.smooth_noise(rng, 2.5)
    fine = s.normal(rng, np.float32)
    # Mining potential: low near rivers, ragged by noise, so workings follow the water.
    pot_noise = s.smooth_noise(rng, 6)
    pond_noise = s.smooth_noise(rng, 2.2)

    n_pixels = h * w
    targets = [
        INITIAL_MINING_FRACTION * n_pixels * growth_factor ** (p / max(n_periods - 1, 1))
        for p in range(n_periods)
    ]
    # Distances to the river are exact up to ``cap``: a little past the widest band of
    # mining the targets ask for, plus what the noise can subtract.
    share = INITIAL_MINING_FRACTION * max(growth_factor, 1.0) * (1 + REVEGETATING_SHARE)
    cap: int | None = None if strips.single else int(2 * share * h * w / (2 * w + h)) + 128
    base = s.field(np.uint8, "base")  # forest, pasture, settlement, road, river
    pot = s.field(np.float32, "potential")  # inf where not a candidate for mining
    while True:
        noise_min, n_candidates = np.inf, 0
        for a, b in strips:
            d_river = _distance(river_centre, shape, a, b, cap)
            river = d_river < 3.5 * (1 + 0.35 * width_var.read(a, b))
            lo, hi = np.searchsorted(trib[0], [a, b])
            river[trib[0, lo:hi] - a, trib[1, lo:hi]] = True
            d_road = _distance(road_centre, shape, a, b, None if cap is None else ROAD_REACH)
            road = d_road <= 1.0
            yy, xx = np.arange(a, b)[:, None], np.arange(w)[None, :]
            bl = blob.read(a, b)
            settlement = np.zeros((b - a, w), dtype=bool)
            for (sr, sc), radius in zip(settlements, (14, 22, 11), strict=True):
                settlement |= np.hypot(yy - sr, xx - sc) + 4 * bl < radius
            pasture = (
                (d_road < ROAD_REACH)
                & (field_noise.read(a, b) > 0.35)
                & ~river
                & ~settlement
                & ~road
            )
            cover = np.full((b - a, w), Cover.FOREST, dtype=np.uint8)
            cover[pasture] = Cover.PASTURE
            cover[settlement] = Cover.SETTLEMENT
            cover[road] = Cover.ROAD
            cover[river] = Cover.RIVER
            base.write(a, cover)
            pn = pot_noise.read(a, b)
            n_candidates += int((cover == Cover.FOREST).sum())
            noise_min = min(noise_min, float(pn.min()))
            pot.write(a, np.where(cover == Cover.FOREST, d_river + POTENTIAL_NOISE * pn, np.inf))

        def candidates() -> Iterator[np.ndarray]:
            for a, b in strips:
                v = pot.read(a, b)
                yield v[np.isfinite(v)]

        thresholds = _thresholds(pot, strips, candidates, n_candidates, targets)
        if cap is None or cap + POTENTIAL_NOISE * noise_min > max(t for t, _ in thresholds) + 1:
            break
        cap *= 2  # a capped pixel could have been mined: widen the window and redo
    cut = thresholds[0][1]

    covers, mining_rows = [], []
    mining_cols = np.zeros(w, dtype=np.int64)
    for p in range(n_periods):
        covers.append(s.field(np.uint8, f"cover{p}"))
        mining_rows.append(np.zeros(h, dtype=np.int64))
    xx = np.arange(w)[None, :]
    for a, b in strips:
        pc = pot.read(a, b)
        ever0 = pc <= thresholds[0][0]
        reveg = ever0 & (xx <= cut)
        ponds = pond_noise.read(a, b) > 0.6
        base_rows = base.read(a, b)
        for p in range(n_periods):
            # Thresholds on one potential field nest, so each period contains the last.
            ever = ever0 if p == 0 else pc <= thresholds[p][0]
            active = ever & ~reveg if p > 0 else ever
            cover = base_rows.copy()
            cover[active] = Cover.SEDIMENT
            cover[active & ponds] = Cover.POND
            if p > 0:
                cover[reveg] = Cover.REGROWTH
            covers[p].write(a, cover)
            mining_rows[p][a:b] = active.sum(axis=1)
            if p == n_periods - 1:
                mining_cols += active.sum(axis=0)
    for f in (width_var, blob, field_noise, pot_noise, pond_noise, base, pot):
        f.delete()
    return Landscape(
        shape=shape,
        strips=strips,
        covers=covers,
        texture=texture,
        fine=fine,
        regrowth_age=list(range(n_periods)),
        settlement_centres=settlements,
        mining_rows=mining_rows,
        mining_cols=mining_cols,
        _tmp=tmp,
    )


def _thresholds(
    pot: Field,
    strips: Strips,
    candidates: Callable[[], Iterator[np.ndarray]],
    n: int,
    targets: list[float],
) -> list[tuple[np.float32, float]]:
    """Per period, the potential at or below which land is (or was) mined, and the
    column at or west of which the first period's mining is abandoned after it."""

    def rank(count: float) -> int:
        return int(min(max(round(count), 1), n)) - 1

    (thr0,), _ = order_stats(candidates, [rank(targets[0])])
    cols = np.zeros(strips.width, dtype=np.int64)
    for a, b in strips:
        cols += (pot.read(a, b) <= thr0).sum(axis=0)
    # The westernmost share of the first period's mining is abandoned after it.
    cut = quantile_of_counts(cols, REVEGETATING_SHARE) if cols.sum() else 0
    n_reveg = int(cols[np.arange(strips.width) <= cut].sum())
    later, _ = order_stats(candidates, [rank(t + n_reveg) for t in targets[1:]])
    return [(thr0, cut), *((t, cut) for t in later)]
