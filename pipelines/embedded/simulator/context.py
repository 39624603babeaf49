"""Demo context layers that agree with the embedded world, in the formats users bring.

Written beside the scenes: LSM concessions, a protected area, native community lands
(GeoJSON polygons), settlements (GeoJSON points) and a grievance log (CSV with lon/lat).
They are placed from the world itself, so the demo has a concession over the mining
corridor, one downstream of it, one away from it; a protected area that later mining
reaches; community lands across the river; and grievances near the workings. All names
are fictional and marked as demo data.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from pyproj import Transformer

from pipelines.embedded.simulator.landscape import Landscape
from pipelines.embedded.simulator.strips import nth_set_pixel
from pipelines.infra.grid import Window
from pipelines.regions import Region

GRIEVANCE_CATEGORIES = ("water contamination", "land invasion", "violence", "road damage")


def _px_to_xy(window: Window, row: float, col: float) -> tuple[float, float]:
    return window.x0 + (col + 0.5) * window.resolution, window.y0 - (row + 0.5) * window.resolution


def _polygon(
    window: Window, to_lonlat: Transformer, rows: list[float], cols: list[float]
) -> dict[str, Any]:
    xs, ys = zip(*(_px_to_xy(window, r, c) for r, c in zip(rows, cols, strict=True)), strict=True)
    lon, lat = to_lonlat.transform(list(xs), list(ys))
    ring = [[round(a, 7), round(b, 7)] for a, b in zip(lon, lat, strict=True)]
    ring.append(ring[0])
    return {"type": "Polygon", "coordinates": [ring]}


def _rect(
    window: Window, to_lonlat: Transformer, r0: float, c0: float, r1: float, c1: float
) -> dict[str, Any]:
    return _polygon(window, to_lonlat, [r0, r0, r1, r1], [c0, c1, c1, c0])


def _fc(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


def _feature(geom: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "properties": props, "geometry": geom}


def _row(land: Landscape, period: int, row: int) -> np.ndarray:
    return land.mining(period, row, row + 1)[0]


def write_context(
    out: Path, region: Region, window: Window, land: Landscape, to_lonlat: Transformer
) -> None:
    out.mkdir(parents=True)
    h, w = window.height, window.width
    r_mid, c_mid = land.mining_centre() or (h / 2, w / 2)

    concessions = [
        _feature(
            _rect(window, to_lonlat, r_mid - 0.18 * h, c_mid - 0.2 * w, r_mid + 0.12 * h, c_mid + 0.1 * w),
            {"concession_id": "LSM-001", "name": "Concesion Aurifera Rio Grande (demo)",
             "holder": "Minera Andina SAC (demo)", "mineral": "gold", "status": "exploitation",
             "granted": "2012-03-14"},
        ),
        _feature(
            _rect(window, to_lonlat, r_mid - 0.1 * h, c_mid + 0.18 * w, r_mid + 0.2 * h, min(c_mid + 0.45 * w, w - 2)),
            {"concession_id": "LSM-002", "name": "Concesion Huaypetue Este (demo)",
             "holder": "Oro del Sur SA (demo)", "mineral": "gold", "status": "exploration",
             "granted": "2016-08-02"},
        ),
        _feature(
            _rect(window, to_lonlat, 2, 2, 0.14 * h, 0.3 * w),
            {"concession_id": "LSM-003", "name": "Concesion Alto Pukiri (demo)",
             "holder": "Minera Andina SAC (demo)", "mineral": "gold", "status": "exploration",
             "granted": "2018-01-22"},
        ),
    ]  # fmt: skip
    protected = [
        _feature(
            _polygon(
                window, to_lonlat,
                [0.78 * h, 0.72 * h, 0.74 * h, h - 2, h - 2],
                [2, 0.35 * w, w - 2, w - 2, 2],
            ),
            {"area_id": "ANP-DEMO-1", "name": "Reserva Comunal Amarakaeri, buffer (demo)",
             "designation": "Zona de amortiguamiento", "iucn_cat": "VI", "kind": "protected"},
        )
    ]  # fmt: skip
    indigenous = [
        _feature(
            _rect(window, to_lonlat, 0.3 * h, 0.82 * w, 0.7 * h, w - 2),
            {"area_id": "CN-DEMO-1", "name": "Comunidad Nativa Boca Pukiri (demo)",
             "people": "Harakbut", "status": "titled", "kind": "indigenous"},
        )
    ]  # fmt: skip
    settlements = []
    names = ("Huepetuhe (demo)", "Delta Uno (demo)", "Pukiri (demo)")
    pops = (7000, 3500, 900)
    for (r, c), name, pop in zip(land.settlement_centres, names, pops, strict=True):
        x, y = _px_to_xy(window, r, c)
        lon, lat = to_lonlat.transform(x, y)
        settlements.append(
            _feature(
                {"type": "Point", "coordinates": [round(lon, 7), round(lat, 7)]},
                {"name": name, "population": pop, "kind": "town"},
            )
        )
    for name, data in (
        ("concessions.geojson", concessions),
        ("protected_areas.geojson", protected),
        ("indigenous_lands.geojson", indigenous),
        ("settlements.geojson", settlements),
    ):
        (out / name).write_text(json.dumps(_fc(data), indent=1) + "\n")

    # Grievances: near mining pixels, dated inside the region's periods.
    rng = np.random.default_rng((region.embedded.seed if region.embedded else 0) + 7)
    with (out / "grievances.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(
            ["grievance_id", "date", "lon", "lat", "category", "concession_id", "description"]
        )
        n = 0
        for p_i, period in enumerate(region.periods):
            n_mining = land.mining_pixels(p_i)
            if n_mining == 0:
                continue
            for _ in range(3):
                j = int(rng.integers(n_mining))
                r, c = nth_set_pixel(land.mining_rows[p_i], j, functools.partial(_row, land, p_i))
                x, y = _px_to_xy(window, r, c)
                lon, lat = to_lonlat.transform(x, y)
                day = period.start.toordinal() + int(
                    rng.integers((period.end - period.start).days + 1)
                )
                cat = GRIEVANCE_CATEGORIES[n % len(GRIEVANCE_CATEGORIES)]
                n += 1
                conc = "LSM-001" if n % 2 else "LSM-002"
                wr.writerow([
                    f"G-{n:03d}", dt.date.fromordinal(day).isoformat(),
                    f"{lon:.6f}", f"{lat:.6f}", cat, conc, f"Demo report: {cat} near mining works",
                ])  # fmt: skip
