"""Sentinel-2 L2A acquisitions of the embedded world: reflectance, clouds, SCL, COGs.

Each acquisition renders the period's land cover with L2A surface reflectances typical
of Amazonian gold-mining landscapes (B02 B03 B04 B08 at 10 m; B11 B12 and SCL at 20 m),
adds texture and per-date noise, then clouds with their shadows, and classifies the
result into a Sen2Cor-like SCL. Digital numbers follow the real encoding:
``DN = (reflectance - offset) / 1e-4`` with offset -0.1 from processing baseline 04.00
on, DN 0 meaning no data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.embedded.simulator.landscape import Cover, Landscape
from pipelines.embedded.simulator.strips import Scratch, quantile

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


class Acquisition:
    """One acquisition of a period's land cover with ``cloud_fraction`` cloud, rendered
    strip by strip (:meth:`strip`); its random fields are drawn when it is made, in the
    order the whole-array renderer drew them, and kept in ``scratch``."""

    def __init__(
        self,
        land: Landscape,
        period: int,
        rng: np.random.Generator,
        cloud_fraction: float,
        scratch: Scratch,
    ) -> None:
        self.land, self.period, self.scratch = land, period, scratch
        strips = scratch.strips
        self.date_noise = scratch.normal(rng, np.float32)
        self.season = rng.normal(1.0, 0.02)
        # Clouds: a smooth field thresholded to the wanted cover; opacity ramps at the edges.
        broad = scratch.smooth_noise(rng, 22)
        detail = scratch.smooth_noise(rng, 4)
        self.cloud_tex = scratch.smooth_noise(rng, 3)
        self.field = scratch.field(np.float32, "cloudfield")
        for r0, r1 in strips:
            self.field.write(r0, broad.read(r0, r1) + 0.25 * detail.read(r0, r1))
        broad.delete()
        detail.delete()
        self.cloud_fraction = cloud_fraction
        self.threshold: Any = np.inf
        if cloud_fraction > 0:
            self.threshold = quantile(
                lambda: (self.field.read(r0, r1).ravel() for r0, r1 in strips),
                strips.size,
                1 - cloud_fraction,
            )
        self._cloudy = 0
        self._scl_px = 0

    def _alpha(self, r0: int, r1: int) -> np.ndarray:
        if self.cloud_fraction <= 0:
            return np.zeros((r1 - r0, self.scratch.strips.width), dtype=np.float32)
        field = self.field.read(r0, r1)
        return np.clip((field - self.threshold) / 0.6 + 0.25, 0, 1).astype(np.float32)

    def strip(self, r0: int, r1: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Reflectance per band (native resolution) and the 20 m SCL of rows ``r0:r1``
        (``r0`` even)."""
        land, p = self.land, self.period
        cover = land.cover(p, r0, r1)
        texture, fine = land.texture.read(r0, r1), land.fine.read(r0, r1)
        date_noise = self.date_noise.read(r0, r1)
        h, w = cover.shape
        refl = np.zeros((len(BANDS), h, w), dtype=np.float32)
        for c, values in REFLECTANCE.items():
            m = cover == c
            if not m.any():
                continue
            v = np.asarray(values, dtype=np.float32)
            if c == Cover.REGROWTH and land.regrowth_age[p] <= 1:
                # Young regrowth: halfway between sediment and secondary forest.
                v = 0.5 * (v + np.asarray(REFLECTANCE[Cover.SEDIMENT], dtype=np.float32))
            amp = TEXTURE_AMPLITUDE[c]
            tex = 1 + amp * texture[m] + 0.4 * amp * fine[m] + 0.02 * date_noise[m]
            refl[:, m] = v[:, None] * tex[None, :] * self.season
        np.clip(refl, 0.001, 1.2, out=refl)

        # A cloud casts its shadow SHADOW_SHIFT_PX away: read the rows above the strip too.
        a0 = max(r0 - SHADOW_SHIFT_PX[0], 0)
        alpha_ext = self._alpha(a0, r1)
        alpha = alpha_ext[r0 - a0 :]
        shadow_src = _shift(alpha_ext, *SHADOW_SHIFT_PX)[r0 - a0 :]
        shadow = (shadow_src > 0.35) & (alpha < 0.15)
        refl[:, shadow] *= 0.35
        cloud = np.asarray(CLOUD_REFLECTANCE, dtype=np.float32)[:, None, None]
        cloud_tex = 1 + 0.05 * self.cloud_tex.read(r0, r1)
        clear = 1 - alpha
        for i in range(len(BANDS)):  # band by band: the same values, a sixth of the memory
            refl[i] = clear * refl[i] + alpha * cloud[i] * cloud_tex

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
        self._cloudy += int(np.isin(scl, (8, 9, 10)).sum())
        self._scl_px += scl.size
        return out, scl

    @property
    def cloud_cover(self) -> float:
        """Percent of SCL cloud classes (8, 9, 10), once every strip is rendered."""
        assert self._scl_px, "cloud_cover before the strips were rendered"
        return round(float(np.float64(self._cloudy) / self._scl_px * 100), 4)

    def close(self) -> None:
        for f in (self.date_noise, self.cloud_tex, self.field):
            f.delete()


#: L1C bands the simulator writes for s2cloudless, with their native resolution.
L1C_BANDS: dict[str, int] = {
    "B01": 60, "B02": 10, "B04": 10, "B05": 20, "B08": 10, "B8A": 20, "B09": 60,
    "B10": 60, "B11": 20, "B12": 20,
}  # fmt: skip


def toa_bands(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Top-of-atmosphere (L1C) reflectance of an acquisition's L2A reflectance ``r`` (a
    strip starting on a multiple of 60 m, or the whole scene), at native resolutions.

    A simple tropical-atmosphere model: path radiance added mostly in the blue, water
    vapour absorption in B09, and B10 (cirrus, 1.375 um) near zero over land but bright
    over clouds. Enough for s2cloudless to see clouds as clouds; not radiative transfer.
    """
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


def _shift(a: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """Shift an array by (rows, cols), filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    if abs(dr) >= h or abs(dc) >= w:
        return out  # shifted off the array
    out[max(dr, 0) : h + min(dr, 0), max(dc, 0) : w + min(dc, 0)] = a[
        max(-dr, 0) : h + min(-dr, 0), max(-dc, 0) : w + min(-dc, 0)
    ]
    return out
