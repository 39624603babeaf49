"""Sentinel-2 L2A acquisitions of the embedded world: reflectance, clouds, SCL, COGs.

Each acquisition renders the period's land cover with L2A surface reflectances typical
of Amazonian gold-mining landscapes (B02 B03 B04 B08 at 10 m; B11 B12 and SCL at 20 m),
adds texture and per-date noise, then clouds with their shadows, and classifies the
result into a Sen2Cor-like SCL. Digital numbers follow the real encoding:
``DN = (reflectance - offset) / 1e-4`` with offset -0.1 from processing baseline 04.00
on, DN 0 meaning no data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from pipelines.grid import Window
from pipelines.simulator.landscape import Cover, smooth_noise

BANDS_10M = ("B02", "B03", "B04", "B08")
BANDS_20M = ("B11", "B12")
BANDS = BANDS_10M + BANDS_20M

# Typical L2A surface reflectance per cover: B02 B03 B04 B08 B11 B12.
REFLECTANCE: dict[Cover, tuple[float, ...]] = {
    Cover.FOREST: (0.020, 0.045, 0.025, 0.330, 0.150, 0.060),
    Cover.RIVER: (0.065, 0.095, 0.105, 0.075, 0.035, 0.020),  # sediment-laden water
    Cover.SEDIMENT: (0.100, 0.140, 0.180, 0.230, 0.310, 0.250),
    Cover.POND: (0.060, 0.100, 0.110, 0.090, 0.045, 0.030),
    Cover.REGROWTH: (0.030, 0.065, 0.045, 0.290, 0.190, 0.095),
    Cover.PASTURE: (0.040, 0.080, 0.060, 0.300, 0.240, 0.130),
    Cover.ROAD: (0.085, 0.105, 0.125, 0.180, 0.230, 0.190),
    Cover.SETTLEMENT: (0.095, 0.115, 0.135, 0.200, 0.225, 0.195),
}
CLOUD_REFLECTANCE = (0.46, 0.45, 0.45, 0.50, 0.33, 0.23)
TEXTURE_AMPLITUDE: dict[Cover, float] = {
    Cover.FOREST: 0.10, Cover.RIVER: 0.05, Cover.SEDIMENT: 0.12, Cover.POND: 0.08,
    Cover.REGROWTH: 0.12, Cover.PASTURE: 0.08, Cover.ROAD: 0.05, Cover.SETTLEMENT: 0.15,
}  # fmt: skip
SCL_OF_COVER: dict[Cover, int] = {
    Cover.FOREST: 4, Cover.REGROWTH: 4, Cover.PASTURE: 4,
    Cover.SEDIMENT: 5, Cover.ROAD: 5, Cover.SETTLEMENT: 5,
    Cover.RIVER: 6, Cover.POND: 6,
}  # fmt: skip
SHADOW_SHIFT_PX = (22, -28)  # (rows, cols) from cloud to its shadow
COG_PROFILE = {"compress": "DEFLATE", "predictor": "2", "blocksize": 256, "overviews": "AUTO"}


@dataclass(frozen=True)
class Acquisition:
    reflectance: dict[str, np.ndarray]  # band -> float32 at its native resolution
    scl: np.ndarray  # uint8 at 20 m
    cloud_cover: float  # percent of SCL classes 8, 9, 10


def render(
    cover: np.ndarray,
    texture: np.ndarray,
    fine: np.ndarray,
    regrowth_age: int,
    rng: np.random.Generator,
    cloud_fraction: float,
) -> Acquisition:
    """One acquisition of a period's land cover with ``cloud_fraction`` cloud."""
    h, w = cover.shape
    date_noise = rng.standard_normal((h, w)).astype(np.float32)
    season = rng.normal(1.0, 0.02)
    refl = np.zeros((len(BANDS), h, w), dtype=np.float32)
    for c, values in REFLECTANCE.items():
        m = cover == c
        if not m.any():
            continue
        v = np.asarray(values, dtype=np.float32)
        if c == Cover.REGROWTH and regrowth_age <= 1:
            # Young regrowth: halfway between sediment and secondary forest.
            v = 0.5 * (v + np.asarray(REFLECTANCE[Cover.SEDIMENT], dtype=np.float32))
        amp = TEXTURE_AMPLITUDE[c]
        tex = 1 + amp * texture[m] + 0.4 * amp * fine[m] + 0.02 * date_noise[m]
        refl[:, m] = v[:, None] * tex[None, :] * season
    np.clip(refl, 0.001, 1.2, out=refl)

    # Clouds: a smooth field thresholded to the wanted cover; opacity ramps at the edges.
    field = smooth_noise(rng, (h, w), 22) + 0.25 * smooth_noise(rng, (h, w), 4)
    thr = np.quantile(field, 1 - cloud_fraction) if cloud_fraction > 0 else np.inf
    alpha = np.clip((field - thr) / 0.6 + 0.25, 0, 1) if cloud_fraction > 0 else np.zeros((h, w))
    alpha = alpha.astype(np.float32)
    shadow_src = _shift(alpha, *SHADOW_SHIFT_PX)
    shadow = (shadow_src > 0.35) & (alpha < 0.15)
    refl[:, shadow] *= 0.35
    cloud = np.asarray(CLOUD_REFLECTANCE, dtype=np.float32)[:, None, None]
    cloud_tex = 1 + 0.05 * smooth_noise(rng, (h, w), 3)
    refl = ((1 - alpha) * refl + alpha * cloud * cloud_tex).astype(np.float32)

    # SCL at 20 m, nearest-neighbour from the 10 m classification.
    scl10 = np.zeros((h, w), dtype=np.uint8)
    for c, code in SCL_OF_COVER.items():
        scl10[cover == c] = code
    scl10[shadow] = 3
    scl10[(alpha > 0.15) & (alpha <= 0.4)] = 10
    scl10[(alpha > 0.4) & (alpha <= 0.7)] = 8
    scl10[alpha > 0.7] = 9
    scl = scl10[::2, ::2].copy()

    out: dict[str, np.ndarray] = {}
    for i, band in enumerate(BANDS):
        if band in BANDS_20M:
            # 20 m pixels integrate four 10 m pixels.
            out[band] = refl[i].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        else:
            out[band] = refl[i]
    cc = float(np.isin(scl, (8, 9, 10)).mean() * 100)
    return Acquisition(reflectance=out, scl=scl, cloud_cover=round(cc, 4))


#: L1C bands the simulator writes for s2cloudless, with their native resolution.
L1C_BANDS: dict[str, int] = {
    "B01": 60, "B02": 10, "B04": 10, "B05": 20, "B08": 10, "B8A": 20, "B09": 60,
    "B10": 60, "B11": 20, "B12": 20,
}  # fmt: skip


def toa_bands(acq: Acquisition) -> dict[str, np.ndarray]:
    """Top-of-atmosphere (L1C) reflectance of an acquisition, at native resolutions.

    A simple tropical-atmosphere model: path radiance added mostly in the blue, water
    vapour absorption in B09, and B10 (cirrus, 1.375 um) near zero over land but bright
    over clouds. Enough for s2cloudless to see clouds as clouds; not radiative transfer.
    """
    r = acq.reflectance
    h, w = r["B02"].shape
    b11 = np.repeat(np.repeat(r["B11"], 2, 0), 2, 1)[:h, :w]
    b12 = np.repeat(np.repeat(r["B12"], 2, 0), 2, 1)[:h, :w]
    bright = np.clip((r["B02"] - 0.12) / 0.3, 0, 1)
    toa10 = {
        "B01": r["B02"] * 0.85 + 0.10,
        "B02": r["B02"] * 0.92 + 0.07,
        "B04": r["B04"] * 0.95 + 0.03,
        "B05": (0.8 * r["B04"] + 0.2 * r["B08"]) * 0.97 + 0.025,
        "B08": r["B08"] * 0.97 + 0.012,
        "B8A": r["B08"] * 1.02 + 0.010,
        "B09": r["B08"] * 0.35 + 0.004,
        "B10": 0.002 + 0.06 * bright,
        "B11": b11 * 0.98 + 0.004,
        "B12": b12 * 0.98 + 0.002,
    }
    out = {}
    for band, res in L1C_BANDS.items():
        f = res // 10
        a = toa10[band].astype(np.float32)
        if f > 1:
            ph, pw = -h % f, -w % f  # pad to whole coarse pixels (edge values)
            a = np.pad(a, ((0, ph), (0, pw)), mode="edge")
            a = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f).mean(axis=(1, 3))
        out[band] = a
    return out


def to_dn(reflectance: np.ndarray, offset: float, scale: float = 1e-4) -> np.ndarray:
    """Encode reflectance as L2A digital numbers (uint16, 0 reserved for no data)."""
    dn = np.round((reflectance - offset) / scale)
    return np.clip(dn, 1, 32767).astype(np.uint16)


def write_cog(
    path: Path, array: np.ndarray, window: Window, nodata: int = 0, categorical: bool = False
) -> None:
    """Write one band as a tiled, deflate-compressed COG with internal overviews."""
    profile = {
        "driver": "COG",
        "width": array.shape[1],
        "height": array.shape[0],
        "count": 1,
        "dtype": array.dtype.name,
        "crs": CRS.from_epsg(window.epsg),
        "transform": Affine(*window.transform),
        "nodata": nodata,
        "overview_resampling": "nearest" if categorical else "average",
        **COG_PROFILE,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def _shift(a: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """Shift an array by (rows, cols), filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dr, 0) : h + min(dr, 0), max(dc, 0) : w + min(dc, 0)] = a[
        max(-dr, 0) : h + min(-dr, 0), max(-dc, 0) : w + min(-dc, 0)
    ]
    return out
