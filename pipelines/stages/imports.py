"""Imported detections: external ASM polygons as the sites of a region and period.

A region's ``detections`` (regions file) names a file of polygons from elsewhere, for
example Amazon Mining Watch's yearly "new mining" layers, and ``asm_sites`` then takes
the region's sites from it instead of from the model, so change, risk and reports run on
third-party detections too.

Reading validates like every other input, and each problem names the file (and the
feature):
- the formats are GeoJSON, GeoPackage, GeoParquet and zipped Shapefile;
- the file must have a CRS (GeoJSON is EPSG:4326 by definition) and at least one feature;
- geometries must be polygons. Points and lines are refused. Geometry collections keep
  their polygonal parts. Invalid rings are repaired (``make_valid``) and counted.
  Empty geometries are skipped and counted;
- the period column must exist and hold period ids (2021, 2021Q3), unless the regions
  file gives one ``period`` for the whole file (Amazon Mining Watch's Guinea file has no
  period column);
- the optional mapped-area column must be numeric and not negative. Without one,
  ``mapped_area_ha`` is null (unknown), never 0.

Which detections belong to a region's period (``belongs``): a detection whose own period
lies within the region's period belongs to it (the quarters 2025Q2..2025Q4 all belong
to the year 2025). A detection of a longer period than the region's belongs to each
region period it overlaps (a 2024 detection belongs to 2024Q1..2024Q4): the only
information is that it was there during the year. In ``mode: new`` (each detection is
new mining of its period), a region period's sites are every detection that belongs to
it or to an earlier period; ``first_seen_period`` is the first region period it belongs
to.

Sites of a period are clipped to the region's AOI, and ``area_ha`` is the clipped
polygon's area in the region's UTM zone. ``mapped_area_ha`` carries the provider's own
figure for the whole polygon unchanged (AMW's ``mined_area_ha_whole_polygon``: the
scarred area inside its detection polygon), so both kinds of total can be reproduced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.geometry
from pyproj import Transformer

from pipelines.infra.grid import bbox_utm_epsg
from pipelines.infra.vectors import POLYGONAL, check_geometry, read_vector, require_columns
from pipelines.regions import DetectionsSpec, Period, Region, RegionsError, parse_period


class DetectionsError(ValueError):
    """An imported detections file that cannot be used; the message names it."""


@dataclass
class Detections:
    """A validated detections file: polygons in EPSG:4326 with their period."""

    frame: Any  # GeoDataFrame: geometry, period, period_start, mapped_area_ha, source_id
    path: Path
    repaired: int = 0
    dropped_empty: int = 0
    notes: list[str] = field(default_factory=list)


def read_detections(spec: DetectionsSpec) -> Detections:
    """Read and validate ``spec``'s file; raise ``DetectionsError`` naming the problem."""
    path = Path(spec.path)
    what = f"detections file {path}"
    frame = read_vector(path, "detections file", DetectionsError)
    period_column = None if spec.period is not None else spec.period_field
    if period_column is not None and period_column not in frame.columns:
        others = ", ".join(str(c) for c in frame.columns if c != frame.geometry.name)
        raise DetectionsError(
            f"{what}: no period column {period_column!r} (detections.period_field); name "
            f"the column that holds each feature's period, or give the whole file one "
            f"period with detections.period (columns: {others})"
        )
    require_columns(
        frame,
        [("detections.mapped_area_field", spec.mapped_area_field), ("detections.id_field", spec.id_field)],
        what,
        DetectionsError,
    )  # fmt: skip
    # Periods: ids the regions file understands, compared by their dates.
    if spec.period is not None:
        periods = [spec.period] * len(frame)
    else:
        periods = [
            str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
            for v in frame[spec.period_field].tolist()
        ]
    spans: dict[str, Period] = {}
    for i, key in enumerate(periods):
        if key not in spans:
            try:
                spans[key] = parse_period(key, f"{path}: feature {i}: {spec.period_field}")
            except RegionsError as e:
                raise DetectionsError("; ".join(e.problems)) from e
    mapped = None
    if spec.mapped_area_field is not None:
        values = frame[spec.mapped_area_field]
        try:
            mapped = values.astype(float).to_numpy()
        except (TypeError, ValueError) as e:
            raise DetectionsError(
                f"detections file {path}: column {spec.mapped_area_field!r} must hold numbers "
                f"(hectares): {e}"
            ) from e
        bad = np.flatnonzero(mapped < 0)
        if len(bad):
            raise DetectionsError(
                f"detections file {path}: feature {int(bad[0])}: {spec.mapped_area_field} is "
                f"negative ({mapped[bad[0]]}); areas are hectares >= 0"
            )

    geoms, keep, repaired, empty = [], [], 0, 0
    for i, raw in enumerate(frame.geometry.tolist()):
        geom, fixed = check_geometry(raw, POLYGONAL, f"{what}: feature {i}", DetectionsError)
        repaired += fixed
        if geom is None:
            empty += 1
            continue
        geoms.append(geom)
        keep.append(i)
    if not keep:
        raise DetectionsError(f"detections file {path}: every geometry is empty")

    import geopandas as gpd

    ids = (
        [str(v) for v in frame[spec.id_field].tolist()]
        if spec.id_field is not None
        else [str(i) for i in range(len(frame))]
    )
    out = gpd.GeoDataFrame(
        {
            "source_id": [ids[i] for i in keep],
            "period": [periods[i] for i in keep],
            "period_start": [spans[periods[i]].start for i in keep],
            "period_end": [spans[periods[i]].end for i in keep],
            "mapped_area_ha": [float(mapped[i]) if mapped is not None else None for i in keep],
        },
        geometry=geoms,
        crs=frame.crs,
    ).to_crs(4326)
    notes = []
    if repaired:
        notes.append(f"{repaired} invalid geometr{'y' if repaired == 1 else 'ies'} repaired")
    if empty:
        notes.append(f"{empty} empty geometr{'y' if empty == 1 else 'ies'} skipped")
    return Detections(out, path, repaired=repaired, dropped_empty=empty, notes=notes)


def belongs(start: Any, end: Any, period: Period) -> bool:
    """Whether a detection of the period ``start``..``end`` belongs to ``period``: its own
    period lies within it, or is longer than it and overlaps it."""
    within = start >= period.start and end <= period.end
    longer = (end - start) > (period.end - period.start)
    return bool(within or (longer and start <= period.end and end >= period.start))


def imported_sites(region: Region, period_id: str, detections: Detections) -> Any:
    """The sites of ``region`` in ``period_id`` from imported detections (EPSG:4326).

    Columns as the model's sites (``mean_probability`` empty), plus ``mapped_area_ha``,
    ``first_seen_period`` and ``source``.
    """
    import geopandas as gpd

    from pipelines.stages.sites import COLUMNS, conform

    spec = region.detections
    assert spec is not None, f"region {region.id} has no detections configured"
    period = region.period(period_id)
    frame = detections.frame
    spans = list(zip(frame["period_start"], frame["period_end"], strict=True))
    if spec.mode == "new":
        # New mining of this period or of any before it: present now.
        mask = [belongs(a, b, period) or b < period.start for a, b in spans]
    else:
        mask = [belongs(a, b, period) for a, b in spans]
    chosen = frame[np.asarray(mask, dtype=bool)] if len(frame) else frame

    def first_seen(start: Any, end: Any, own: str) -> str:
        hit = next((p.id for p in region.periods if belongs(start, end, p)), None)
        return hit or own

    aoi = shapely.geometry.shape(region.geometry)
    chosen = chosen[chosen.intersects(aoi)]
    clipped = shapely.intersection(chosen.geometry.to_numpy(), aoi)
    epsg = bbox_utm_epsg(region.bbox)  # the composite grid's zone
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True).transform
    areas = [shapely.transform(g, to_utm, interleaved=False).area / 10_000 for g in clipped]
    rows = []
    for (_, rec), geom, area in zip(chosen.iterrows(), clipped, areas, strict=True):
        digest = hashlib.sha1(
            f"{region.id}|{period_id}|{rec['source_id']}|".encode()
            + shapely.to_wkb(shapely.set_precision(geom, 1e-7))
        ).hexdigest()[:12]
        rows.append(
            {
                "site_id": f"{region.id}-{period_id}-{digest}",
                "region": region.id,
                "period": period_id,
                "area_ha": round(area, 4),
                "mean_probability": np.nan,
                "mapped_area_ha": rec["mapped_area_ha"],
                "first_seen_period": (
                    first_seen(rec["period_start"], rec["period_end"], rec["period"])
                    if spec.mode == "new"
                    else period_id
                ),
                "source": f"imported:{detections.path.name}",
                "geometry": geom,
            }
        )
    out = gpd.GeoDataFrame(rows, columns=list(COLUMNS), geometry="geometry", crs=4326)
    return conform(out.sort_values("site_id").reset_index(drop=True))
