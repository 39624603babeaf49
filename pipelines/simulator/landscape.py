"""The landscape of the embedded world: land cover per period, with mining that spreads.

A seeded, textured Madre de Dios-like landscape on a 10 m UTM window: rainforest cut by
a meandering turbid river and a tributary, a highway with settlements and pasture along
it, and gold mining (bare sediment and ponds) that spreads out from the rivers period by
period. The first period's westernmost workings are abandoned and re-vegetate. Mining
area grows geometrically so that the last period holds ``growth_factor`` times the
first period's active mining (Madre de Dios grew about 1.5x from 2019 to 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage


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


@dataclass(frozen=True)
class Landscape:
    """Land cover per period plus the fixed texture of the world."""

    covers: list[np.ndarray]  # uint8 Cover per period, shape (H, W)
    mining: list[np.ndarray]  # bool: active mining per period (the truth mask)
    revegetating: list[np.ndarray]  # bool: abandoned mining land re-vegetating
    regrowth_age: list[int]  # periods since abandonment (0 in the first period)
    texture: np.ndarray  # float32 (H, W), mean 0, canopy/soil texture
    fine: np.ndarray  # float32 (H, W), pixel-scale texture
    river_centre: np.ndarray  # bool: river centre line (for context layers)
    road_centre: np.ndarray  # bool
    settlement_centres: list[tuple[int, int]]  # (row, col)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, rescaled to zero mean and unit variance."""
    z = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    z -= z.mean()
    sd = z.std()
    return (z / sd if sd > 0 else z).astype(np.float32)


def _line_mask(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    r = np.clip(np.round(rows).astype(int), 0, shape[0] - 1)
    c = np.clip(np.round(cols).astype(int), 0, shape[1] - 1)
    m[r, c] = True
    return m


def _meander(
    rng: np.random.Generator, n: int, start: float, amp: float, wavelength: float
) -> np.ndarray:
    t = np.arange(n, dtype=float)
    walk = ndimage.gaussian_filter1d(np.cumsum(rng.standard_normal(n)), 12)
    phase = rng.uniform(0, 2 * np.pi)
    return start + amp * np.sin(2 * np.pi * t / wavelength + phase) + 1.5 * walk


def build_landscape(
    seed: int, shape: tuple[int, int], n_periods: int, growth_factor: float
) -> Landscape:
    """Land cover for each of ``n_periods`` periods on a window of ``shape`` pixels."""
    rng = np.random.default_rng(seed)
    h, w = shape

    # Main river: west to east across the middle, meandering; a tributary from the north.
    cols = np.linspace(0, w - 1, w * 3)
    main_rows = _meander(rng, cols.size, start=h * 0.55, amp=h * 0.08, wavelength=cols.size / 1.7)
    river_centre = _line_mask(shape, main_rows, cols)
    trib_rows = np.linspace(0, h * 0.5, h * 3)
    trib_cols = _meander(
        rng, trib_rows.size, start=w * 0.62, amp=w * 0.05, wavelength=trib_rows.size
    )
    # End the tributary where it meets the main river.
    trib = _line_mask(shape, trib_rows, trib_cols)
    trib &= np.cumsum(river_centre, axis=0) == 0
    river_centre |= trib
    dist_river = ndimage.distance_transform_edt(~river_centre).astype(np.float32)
    width_var = 1 + 0.35 * smooth_noise(rng, shape, 20)
    river = dist_river < 3.5 * width_var  # about 50-90 m wide
    river |= trib & (ndimage.distance_transform_edt(~trib) < 2.0)

    # Highway: a straight line across the north with a slight slope.
    r0, r1 = h * rng.uniform(0.12, 0.2), h * rng.uniform(0.22, 0.3)
    road_cols = np.linspace(0, w - 1, w * 2)
    road_centre = _line_mask(shape, np.linspace(r0, r1, road_cols.size), road_cols)
    dist_road = ndimage.distance_transform_edt(~road_centre).astype(np.float32)
    road = dist_road <= 1.0

    # Settlements: clusters along the highway.
    settlements: list[tuple[int, int]] = []
    rr, cc = np.nonzero(road_centre)
    order = np.argsort(cc)
    for frac in (0.18, 0.55, 0.86):
        i = order[int(frac * (order.size - 1))]
        settlements.append((int(rr[i]), int(cc[i])))
    yy, xx = np.mgrid[0:h, 0:w]
    blob = smooth_noise(rng, shape, 3)
    settlement = np.zeros(shape, dtype=bool)
    for (sr, sc), radius in zip(settlements, (14, 22, 11), strict=True):
        d = np.hypot(yy - sr, xx - sc)
        settlement |= d + 4 * blob < radius

    # Pasture: fields cut from the forest near the highway.
    field_noise = smooth_noise(rng, shape, 8)
    pasture = (dist_road < 70) & (field_noise > 0.35) & ~river & ~settlement & ~road

    texture = smooth_noise(rng, shape, 2.5)
    fine = rng.standard_normal(shape).astype(np.float32)

    # Mining potential: low near rivers, ragged by noise, so workings follow the water.
    potential = dist_river + 18.0 * smooth_noise(rng, shape, 6)
    candidates = ~(river | road | settlement | pasture)
    pond_noise = smooth_noise(rng, shape, 2.2)

    n_pixels = h * w
    targets = [
        INITIAL_MINING_FRACTION * n_pixels * growth_factor ** (p / max(n_periods - 1, 1))
        for p in range(n_periods)
    ]
    pot_c = np.where(candidates, potential, np.inf)
    flat = np.sort(pot_c[candidates])

    def mined_with(count: float) -> np.ndarray:
        k = int(min(max(round(count), 1), flat.size)) - 1
        return pot_c <= flat[k]

    ever0 = mined_with(targets[0])
    # The westernmost share of the first period's mining is abandoned after it.
    c_idx = np.nonzero(ever0)[1]
    cut = np.quantile(c_idx, REVEGETATING_SHARE) if c_idx.size else 0
    reveg = ever0 & (xx <= cut)
    n_reveg = int(reveg.sum())

    covers: list[np.ndarray] = []
    mining: list[np.ndarray] = []
    revegetating: list[np.ndarray] = []
    ages: list[int] = []
    for p in range(n_periods):
        # Thresholds on one potential field nest, so each period contains the last.
        ever = ever0 if p == 0 else mined_with(targets[p] + n_reveg)
        active = ever & ~reveg if p > 0 else ever
        rv = reveg if p > 0 else np.zeros(shape, dtype=bool)
        cover = np.full(shape, Cover.FOREST, dtype=np.uint8)
        cover[pasture] = Cover.PASTURE
        cover[settlement] = Cover.SETTLEMENT
        cover[road] = Cover.ROAD
        cover[river] = Cover.RIVER
        cover[active] = Cover.SEDIMENT
        cover[active & (pond_noise > 0.6)] = Cover.POND
        cover[rv] = Cover.REGROWTH
        covers.append(cover)
        mining.append(active)
        revegetating.append(rv)
        ages.append(p)

    return Landscape(
        covers=covers,
        mining=mining,
        revegetating=revegetating,
        regrowth_age=ages,
        texture=texture,
        fine=fine,
        river_centre=river_centre,
        road_centre=road_centre,
        settlement_centres=settlements,
    )
