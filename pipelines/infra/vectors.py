"""Reading and checking user vector files: the rules every input file shares.

Imported detections (``pipelines.stages.imports``) and context layers (``pipelines.stages.context``)
both come from users, so both get the same treatment:
- formats: GeoJSON, GeoPackage, GeoParquet, a zipped Shapefile (and CSV with
  coordinates where the caller allows it);
- the file must exist, be readable, hold features and carry a CRS;
- columns the configuration names must exist, and the error lists the ones that do;
- geometries are checked against the kinds the layer allows.

Every error names the file, and the feature or row where there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import shapely

SUFFIXES = (".geojson", ".json", ".gpkg", ".parquet", ".zip", ".shp")
POLYGONAL = ("Polygon", "MultiPolygon")
LINEAR = ("LineString", "MultiLineString")
PUNCTUAL = ("Point", "MultiPoint")


def read_vector(path: Path, what: str, error: type[ValueError]) -> Any:
    """A GeoDataFrame from ``path`` with at least one feature and a CRS.

    ``what`` names the input in messages ("detections file", "protected_areas layer").
    """
    import geopandas as gpd

    if not path.exists():
        raise error(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise error(
            f"{what} {path}: unsupported format {suffix!r} (use GeoJSON, GeoPackage, "
            "GeoParquet or a zipped Shapefile)"
        )
    try:
        if suffix == ".parquet":
            frame = gpd.read_parquet(path)
        elif suffix == ".zip":
            frame = gpd.read_file(f"zip://{path}")
        else:
            frame = gpd.read_file(path)
    except Exception as e:  # pyogrio/pyarrow raise many types for unreadable files
        raise error(f"{what} {path}: cannot be read ({e})") from e
    if len(frame) == 0:
        raise error(f"{what} {path} has no features")
    if frame.crs is None:
        raise error(
            f"{what} {path} has no CRS: give it one (a .prj beside a Shapefile, the crs of a "
            "GeoPackage layer) so its coordinates can be placed"
        )
    x0, y0, x1, y1 = (float(v) for v in frame.total_bounds)
    lonlat = -180.5 <= x0 <= x1 <= 360.5 and -90.5 <= y0 <= y1 <= 90.5
    finite = all(map(math.isfinite, (x0, y0, x1, y1)))  # NaN when every geometry is empty
    if frame.crs.is_geographic and finite and not lonlat:
        raise error(
            f"{what} {path}: coordinates span x {x0:.6g} to {x1:.6g}, y {y0:.6g} to "
            f"{y1:.6g}, which is not longitude/latitude as its CRS "
            f"({frame.crs.to_string()}) says: the file's CRS is wrong (projected metres "
            "in a GeoJSON?); reproject it or give it its real CRS"
        )
    return frame


def require_columns(
    frame: Any, names: Sequence[tuple[str, str | None]], what: str, error: type[ValueError]
) -> None:
    """Each configured ``(setting, column)`` must be a column of ``frame``."""
    geometry = getattr(frame, "geometry", None)
    gname = geometry.name if geometry is not None else None
    columns = [str(c) for c in frame.columns if c != gname]
    for setting, name in names:
        if name is not None and name not in frame.columns:
            raise error(
                f"{what}: no column {name!r} ({setting}); it has "
                f"{', '.join(columns) or 'no attribute columns'}"
            )


def polygonal_part(geom: shapely.Geometry) -> shapely.Geometry:
    """The union of a geometry's polygons (an empty polygon when it has none)."""
    kind = geom.geom_type
    if kind == "Polygon" or (kind == "MultiPolygon" and geom.is_valid):
        return geom  # already its own union (an overlay on thousands: no noding)
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in POLYGONAL]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def check_geometry(
    geom: shapely.Geometry | None,
    allowed: Sequence[str],
    where: str,
    error: type[ValueError],
) -> tuple[shapely.Geometry | None, bool]:
    """(geometry or None when empty, whether it was repaired) for one feature.

    Polygon layers: geometry collections keep their polygons, and invalid polygons are
    repaired with ``make_valid``. A repair that leaves no polygon counts as empty. Any
    other geometry type than ``allowed`` is an error naming ``where``.
    """
    if geom is None or geom.is_empty:
        return None, False
    kind = geom.geom_type
    polygons = allowed == POLYGONAL
    if kind == "GeometryCollection" and polygons:
        geom = polygonal_part(geom)
        if geom.is_empty:
            raise error(f"{where}: a geometry collection without polygons")
    elif kind not in allowed:
        raise error(f"{where} is a {kind}; this layer takes {' or '.join(allowed)} geometries")
    if geom.is_valid:
        return geom, False
    fixed = shapely.make_valid(geom)
    if polygons:
        fixed = polygonal_part(fixed)
    return (None if fixed.is_empty else fixed), True


def aoi_area_ha(region: Any) -> float:
    """The area of a region's AOI, in hectares, measured in its UTM zone."""
    from pyproj import Transformer

    from pipelines.infra.grid import bbox_utm_epsg

    to_utm = Transformer.from_crs(4326, bbox_utm_epsg(region.bbox), always_xy=True).transform
    aoi = shapely.geometry.shape(region.geometry)
    return float(shapely.transform(aoi, to_utm, interleaved=False).area / 10_000)
