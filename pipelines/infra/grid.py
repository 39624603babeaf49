"""The Sentinel-2 grid: UTM zones, MGRS tile names, and pixel-aligned windows.

Sentinel-2 L2A tiles are 109.8 km squares on the UTM grid of their zone. A tile's
upper-left corner is a multiple of 100 km in x and of 100 km plus 20 m in y
(19LCF: x 300000, y 8600020), so snapping to 20 m keeps the 10 m and 20 m pixels of a
window aligned with the real tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyproj import Transformer

_BANDS = "CDEFGHJKLMNPQRSTUVWX"
_COL_SETS = ("STUVWXYZ", "ABCDEFGH", "JKLMNPQR")  # indexed by zone % 3
_ROWS = "ABCDEFGHJKLMNPQRSTUV"
ALIGN_M = 20  # pixel edges of both 10 m and 20 m Sentinel-2 grids fall on multiples of 20 m


def bbox_utm_epsg(bbox: tuple[float, float, float, float]) -> int:
    """The UTM zone of a bbox's centre: the CRS of a region's composite grid and areas."""
    west, south, east, north = bbox
    return utm_epsg((west + east) / 2, (south + north) / 2)


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 / UTM zone containing (lon, lat)."""
    zone = utm_zone(lon)
    return (32600 if lat >= 0 else 32700) + zone


def utm_zone(lon: float) -> int:
    return min(math.floor((lon + 180) / 6) + 1, 60)


def mgrs_tile(lon: float, lat: float) -> str:
    """The Sentinel-2 (MGRS) tile whose 100 km square contains (lon, lat)."""
    zone = utm_zone(lon)
    band = _BANDS[min(max(math.floor((lat + 80) / 8), 0), len(_BANDS) - 1)]
    epsg = utm_epsg(lon, lat)
    x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(lon, lat)
    col = _COL_SETS[zone % 3][int(x // 100_000) - 1]
    row_index = int(y // 100_000) % 20
    if zone % 2 == 0:
        row_index = (row_index + 5) % 20
    return f"{zone:02d}{band}{col}{_ROWS[row_index]}"


@dataclass(frozen=True)
class Window:
    """A north-up pixel window in a UTM CRS."""

    epsg: int
    x0: float  # west edge, metres
    y0: float  # north edge, metres
    width: int
    height: int
    resolution: float

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL/affine order: (a, b, c, d, e, f) = (res, 0, x0, 0, -res, y0)."""
        return (self.resolution, 0.0, self.x0, 0.0, -self.resolution, self.y0)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (
            self.x0,
            self.y0 - self.height * self.resolution,
            self.x0 + self.width * self.resolution,
            self.y0,
        )

    def at(self, resolution: float) -> Window:
        """The same extent at another resolution (must divide the extent)."""
        f = resolution / self.resolution
        return Window(
            self.epsg,
            self.x0,
            self.y0,
            round(self.width / f),
            round(self.height / f),
            resolution,
        )


def window_for_bbox(
    bbox: tuple[float, float, float, float], resolution: float = 10.0, margin_m: float = 0.0
) -> Window:
    """The UTM window covering a lon/lat bbox, snapped outward to the Sentinel-2 grid."""
    w, s, e, n = bbox
    epsg = utm_epsg((w + e) / 2, (s + n) / 2)
    t = Transformer.from_crs(4326, epsg, always_xy=True)
    xs, ys = t.transform([w, w, e, e], [s, n, s, n])
    xmin = math.floor((min(xs) - margin_m) / ALIGN_M) * ALIGN_M
    xmax = math.ceil((max(xs) + margin_m) / ALIGN_M) * ALIGN_M
    ymin = math.floor((min(ys) - margin_m) / ALIGN_M) * ALIGN_M
    ymax = math.ceil((max(ys) + margin_m) / ALIGN_M) * ALIGN_M
    return Window(
        epsg=epsg,
        x0=float(xmin),
        y0=float(ymax),
        width=round((xmax - xmin) / resolution),
        height=round((ymax - ymin) / resolution),
        resolution=resolution,
    )
