"""Property tests (Hypothesis) of the grid arithmetic: a region's UTM window covers its
bbox, sits on the 20 m grid both Sentinel-2 resolutions share, and keeps its extent at
20 m; UTM zones and MGRS tiles agree with the longitude."""

from __future__ import annotations

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pyproj import Transformer

from pipelines.infra.grid import (
    ALIGN_M,
    bbox_utm_epsg,
    mgrs_tile,
    utm_epsg,
    utm_zone,
    window_for_bbox,
)

LON = st.floats(-179.5, 179.5, allow_nan=False)
LAT = st.floats(-60, 60, allow_nan=False)
EDGE = st.floats(0.001, 0.5, allow_nan=False)  # degrees: 100 m to 50 km


@settings(max_examples=200, deadline=None)
@given(lon=LON, lat=LAT, dx=EDGE, dy=EDGE, margin=st.sampled_from([0.0, 100.0, 1000.0]))
def test_the_window_covers_the_bbox_on_the_20_m_grid(lon: float, lat: float, dx: float, dy: float, margin: float) -> None:  # fmt: skip
    assume(
        utm_zone(lon) == utm_zone(lon + dx)
    )  # a region lies in one zone (the regions file says so)
    bbox = (lon, lat, lon + dx, lat + dy)
    w = window_for_bbox(bbox, 10.0, margin)
    assert w.epsg == bbox_utm_epsg(bbox) == utm_epsg(lon + dx / 2, lat + dy / 2)
    x0, y0, x1, y1 = w.bounds
    for edge in (x0, y0, x1, y1):
        assert math.isclose(edge / ALIGN_M, round(edge / ALIGN_M), abs_tol=1e-9), "on the 20 m grid"
    t = Transformer.from_crs(4326, w.epsg, always_xy=True)
    xs, ys = t.transform([bbox[0], bbox[0], bbox[2], bbox[2]], [bbox[1], bbox[3], bbox[1], bbox[3]])
    assert x0 <= min(xs) - margin + 1e-6 and x1 >= max(xs) + margin - 1e-6
    assert y0 <= min(ys) - margin + 1e-6 and y1 >= max(ys) + margin - 1e-6
    assert x1 - x0 < max(xs) - min(xs) + 2 * margin + 2 * ALIGN_M + 1e-6, "snapped, not padded"
    coarse = w.at(20.0)
    assert coarse.bounds == w.bounds and (coarse.width * 2, coarse.height * 2) == (
        w.width,
        w.height,
    )


@given(lon=st.floats(-180, 179.999, allow_nan=False), lat=LAT)
def test_zones_and_mgrs_tiles_follow_the_longitude(lon: float, lat: float) -> None:
    zone = utm_zone(lon)
    # to a nanodegree: lon + 180 rounds (-1e-57 + 180 is 180.0, so zone 31)
    assert 1 <= zone <= 60 and -180 + 6 * (zone - 1) - 1e-9 <= lon < -180 + 6 * zone + 1e-9
    assert utm_epsg(lon, lat) == (32600 if lat >= 0 else 32700) + zone
    tile = mgrs_tile(lon, lat)
    assert len(tile) == 5 and int(tile[:2]) == zone and tile[2] in "CDEFGHJKLMNPQRSTUVWX"
