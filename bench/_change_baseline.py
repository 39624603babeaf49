# The change stage as of commit 5ae7639 (whole-union overlay per site), kept as the
# baseline bench/change.py --baseline measures against. Not used by the pipeline.
# ruff: noqa
"""The change stage: ASM sites of a period against the previous period of the same region.

Sixth step of the flow (probability -> sites -> **change** -> risk). In the region's UTM
zone, with ``prev`` the union of last period's sites and ``cur`` this period's:

- ``new``: a site of this period that touches no mining of the previous period;
- ``expanded``: the part of a site that grew beyond the previous mining it touches
  (site minus ``prev``);
- ``stable``: mining in both periods (site intersect ``prev``);
- ``abandoned`` and ``revegetating``: land mined in any earlier period that is not
  mined now (the footprint of all earlier mining minus ``cur``; the footprint travels
  forward as the previous period's change rows of every kind), split per connected part
  by this period's composite. A part whose mean median NDVI reached ``NDVI_RECOVERED``
  is re-vegetating, the rest is abandoned. These two are a state, not a transition: land
  abandoned in 2020 that greens up by 2022 is re-vegetating in 2022's rows. Without a
  composite (imported detections) every part is abandoned and the summary says
  re-vegetation was not assessed.

``first_seen_period``: this period for new and expanded areas. Stable, abandoned and
re-vegetating areas take the earliest first-seen period among the previous period's
change rows they overlap. When the previous period's change was not computed, they take
the previous period, a bound (the summary notes it). The first period of a region has no
previous one, so all of its mining is ``new``: the baseline.

Parts smaller than ``MIN_PART_HA`` (one 10 m pixel) are overlay slivers and are dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.features
import shapely
from pyproj import Transformer

from pipelines.infra.grid import bbox_utm_epsg
from pipelines.regions import Region, RegionsError, parse_period
from pipelines.infra.storage import atomic_path, partition_path
from pipelines.infra.vectors import polygonal_part

KINDS = ("new", "expanded", "stable", "abandoned", "revegetating")
# Mean composite NDVI at which formerly mined land counts as re-vegetating. Bare tailings,
# sediment and ponds stay below about 0.25 (the demo's spectra: 0.12); first-year
# regrowth reaches about 0.4, older regrowth 0.7; intact lowland forest is above 0.8.
NDVI_RECOVERED = 0.35
MIN_PART_HA = 0.01
COLUMNS = (
    "change_id", "region", "period", "kind", "area_ha", "first_seen_period", "site_id",
    "mean_ndvi", "geometry",
)  # fmt: skip


#: Summary columns that are DOUBLE in every file, null or not.
SUMMARY_FLOATS = (
    "mining_ha", *(f"{k}_ha" for k in KINDS), "previous_mining_ha", "growth_vs_previous",
    "first_mining_ha", "growth_vs_first",
)  # fmt: skip


def change_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "change", region_id, period_id, ".parquet")


def summary_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "summary", region_id, period_id, ".parquet")


@dataclass
class ChangeResult:
    frame: Any  # GeoDataFrame, EPSG:4326, COLUMNS
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _ndvi_mean(composite: Path, geom: shapely.Geometry) -> float:
    """Mean composite NDVI over ``geom`` (in the composite's CRS); NaN where unobserved."""
    with rasterio.open(composite) as src:
        band = list(src.descriptions).index("NDVI") + 1
        try:
            window = rasterio.features.geometry_window(src, [geom])
        except rasterio.errors.WindowError:  # the area lies outside the composite
            return float("nan")
        data = src.read(band, window=window)
        if data.size == 0:
            return float("nan")
        inside = rasterio.features.geometry_mask(
            [geom], data.shape, src.window_transform(window), invert=True, all_touched=True
        )
    values = data[inside & np.isfinite(data)]
    return float(values.mean()) if values.size else float("nan")


def _clean(frame: Any, epsg: int) -> Any:
    """``frame`` in UTM with valid polygonal geometries snapped to 1 cm.

    Pixel-edge polygons that went to EPSG:4326 and back can touch themselves by a
    rounding error, which GEOS overlay refuses; snapping to a centimetre grid repairs
    that without moving anything by more than a centimetre.
    """
    out = frame.to_crs(epsg)
    geoms = shapely.set_precision(shapely.make_valid(out.geometry.to_numpy()), 0.01)
    polys = [polygonal_part(g) for g in geoms]
    return out.set_geometry(np.asarray(polys, dtype=object), crs=epsg)


def _start(period_id: str) -> Any:
    try:
        return parse_period(period_id).start
    except RegionsError:  # a custom {id, start, end} period of another region: sort last
        return parse_period("2100").start


def _earliest(geom: shapely.Geometry, history: Any, fallback: str) -> str:
    """Earliest first_seen_period of the history rows ``geom`` overlaps."""
    if history is None or len(history) == 0:
        return fallback
    shapes = history.geometry.to_numpy()
    overlap = shapely.area(shapely.intersection(shapes, geom))
    hits = history[overlap > 0]
    if len(hits) == 0:
        return fallback
    order = hits.sort_values("period_start")
    return str(order["first_seen_period"].iloc[0])


def detect_change(
    region: Region,
    period_id: str,
    current: Any,
    previous: Any | None,
    *,
    previous_change: Any | None = None,
    composite: Path | None = None,
) -> ChangeResult:
    """Change rows for ``period_id`` (sites frames in EPSG:4326; ``previous`` None: first)."""
    import geopandas as gpd

    epsg = bbox_utm_epsg(region.bbox)
    notes: list[str] = []
    cur = _clean(current, epsg)
    prev_period = region.previous_period(period_id)
    rows: list[dict[str, Any]] = []

    def add(kind: str, geom: shapely.Geometry, first: str, site: str | None, ndvi: float) -> None:
        geom = polygonal_part(geom)  # overlays can leave slivers of lines and points
        area = geom.area / 10_000
        if geom.is_empty or area < MIN_PART_HA:
            return
        digest = hashlib.sha1(
            f"{region.id}|{period_id}|{kind}|".encode()
            + shapely.to_wkb(shapely.set_precision(geom, 0.01))
        ).hexdigest()[:12]
        rows.append(
            {
                "change_id": f"{region.id}-{period_id}-{kind}-{digest}",
                "region": region.id, "period": period_id, "kind": kind,
                "area_ha": round(area, 4), "first_seen_period": first, "site_id": site,
                "mean_ndvi": ndvi, "geometry": geom,
            }
        )  # fmt: skip

    def own_first(rec: Any) -> str:
        value = rec.get("first_seen_period")
        return str(value) if isinstance(value, str) and value else period_id

    if previous is None:
        for _, rec in cur.iterrows():
            add("new", rec.geometry, own_first(rec), rec["site_id"], np.nan)
        notes.append("first period of the region: all its mining is new (the baseline)")
    else:
        prev = _clean(previous, epsg)
        history = None
        if previous_change is not None and len(previous_change):
            history = _clean(previous_change, epsg)
            history = history.assign(
                period_start=[_start(str(v)) for v in history["first_seen_period"]]
            )
        else:
            notes.append(
                f"no asm_change for {prev_period.id if prev_period else 'the previous period'}: "
                "first_seen_period of older mining is a bound (that period), and land "
                "abandoned before it is not tracked"
            )
        bound = prev_period.id if prev_period else period_id
        prev_u = shapely.union_all(prev.geometry.to_numpy()) if len(prev) else shapely.Polygon()
        cur_u = shapely.union_all(cur.geometry.to_numpy()) if len(cur) else shapely.Polygon()
        for _, rec in cur.iterrows():
            s = rec.geometry
            kept = s.intersection(prev_u)
            if kept.area / 10_000 < MIN_PART_HA:
                add("new", s, own_first(rec), rec["site_id"], np.nan)
                continue
            add("stable", kept, _earliest(kept, history, bound), rec["site_id"], np.nan)
            add("expanded", s.difference(prev_u), period_id, rec["site_id"], np.nan)
        # Everything mined before: last period's sites and the footprint its change carried.
        footprint = prev_u
        if history is not None:
            footprint = shapely.union_all([prev_u, *history.geometry.to_numpy()])
        gone = footprint.difference(cur_u)
        comp_crs = None
        if composite is not None and composite.exists():
            with rasterio.open(composite) as src:
                comp_crs = src.crs
        else:
            notes.append("no composite for this period: re-vegetation not assessed")
        for part in shapely.get_parts(gone):
            ndvi = np.nan
            if comp_crs is not None:
                to_comp = Transformer.from_crs(epsg, comp_crs, always_xy=True).transform
                ndvi = _ndvi_mean(composite, shapely.transform(part, to_comp, interleaved=False))  # type: ignore[arg-type]
            kind = "revegetating" if np.isfinite(ndvi) and ndvi >= NDVI_RECOVERED else "abandoned"
            add(kind, part, _earliest(part, history, bound), None, ndvi)

    frame = gpd.GeoDataFrame(rows, columns=list(COLUMNS), geometry="geometry", crs=epsg)
    frame = frame.sort_values("change_id").reset_index(drop=True).to_crs(4326)
    for col in ("area_ha", "mean_ndvi"):
        frame[col] = frame[col].astype("float64")
    for col in ("change_id", "region", "period", "kind", "first_seen_period", "site_id"):
        frame[col] = frame[col].astype("string")
    by_kind = {k: float(frame.loc[frame["kind"] == k, "area_ha"].sum()) for k in KINDS}
    summary = {
        "region": region.id,
        "period": period_id,
        "period_start": region.period(period_id).start,
        "site_count": len(current),
        "mining_ha": round(float(current["area_ha"].sum()), 4) if len(current) else 0.0,
        **{f"{k}_ha": round(v, 4) for k, v in by_kind.items()},
        "previous_period": prev_period.id if previous is not None and prev_period else None,
        "notes": "; ".join(notes),
    }
    summary = summarise(summary, None, None)  # the growth columns, filled by the caller
    return ChangeResult(frame=frame, summary=summary, notes=notes)


def summarise(
    summary: dict[str, Any], previous_mining_ha: float | None, first: tuple[str, float] | None
) -> dict[str, Any]:
    """Add growth factors: against the previous period and against the region's first."""
    out = dict(summary)
    out["previous_mining_ha"] = previous_mining_ha
    out["growth_vs_previous"] = (
        round(out["mining_ha"] / previous_mining_ha, 4) if previous_mining_ha else None
    )
    out["first_period"] = first[0] if first else None
    out["first_mining_ha"] = first[1] if first else None
    out["growth_vs_first"] = round(out["mining_ha"] / first[1], 4) if first and first[1] else None
    return out


def write_change(result: ChangeResult, root: Path, region_id: str, period_id: str) -> Path:
    """The change GeoParquet and the one-row summary Parquet, each written atomically."""
    import pandas as pd

    target = change_path(root, region_id, period_id)
    with atomic_path(target) as tmp:
        result.frame.to_parquet(tmp, write_covering_bbox=True, index=False)
    summary = pd.DataFrame([result.summary])
    for col in SUMMARY_FLOATS:  # a first period's nulls must still be DOUBLE columns
        if col in summary:
            summary[col] = summary[col].astype("float64")
    for col in ("previous_period", "first_period", "notes"):
        if col in summary:
            summary[col] = summary[col].astype("string")
    with atomic_path(summary_path(root, region_id, period_id)) as tmp:
        summary.to_parquet(tmp, index=False)
    return target
