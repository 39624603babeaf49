"""Exports for desktop GIS: a region's tables as GeoPackage, FlatGeobuf or GeoJSON.

The published tables are GeoParquet, which QGIS reads only through a GDAL built with the
Parquet driver; Debian's GDAL 3.6 (what many QGIS installs use) has none. ``asmwatch
export`` writes them in formats every GDAL reads:

- ``gpkg``: one GeoPackage file, one layer per table (attribute tables such as
  ``region_summary`` as GeoPackage attribute tables);
- ``fgb`` and ``geojson``: a folder with one file per spatial table, and the attribute
  tables as CSV beside them.

Tables are read and written a chunk of rows at a time (``geotable.streamed``), so an
export's memory follows the chunk, not the region. Geometries stay in EPSG:4326, as
published. Columns OGR cannot store (lists, structs) become JSON text, and the
``bbox`` covering column is left out. The output appears whole or not at all (written
beside its target, then renamed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.infra.geotable import GeoTableError, geo_metadata, read_chunks, streamed
from pipelines.infra.layout import (
    RISK_TABLES,
    change_path,
    context_table_path,
    risk_path,
    sites_path,
    summary_path,
)
from pipelines.infra.storage import atomic_dir, atomic_path
from pipelines.stages.context import TABLE_KINDS as CONTEXT_TABLES

#: ``--format`` -> (GDAL driver, file suffix).
EXPORT_FORMATS: dict[str, tuple[str, str]] = {
    "gpkg": ("GPKG", ".gpkg"),
    "fgb": ("FlatGeobuf", ".fgb"),
    "geojson": ("GeoJSON", ".geojson"),
}


def risk_path_of(table: str, root: Path, region_id: str, period_id: str) -> Path:
    return risk_path(root, table, region_id, period_id)


#: The tables of a region, per period (name -> path of one period's file).
PERIOD_TABLES: dict[str, Callable[[Path, str, str], Path]] = {
    "asm_sites": sites_path,
    "asm_change": change_path,
    "region_summary": summary_path,
    **{table: partial(risk_path_of, table) for table in RISK_TABLES},
}

CHUNK_ROWS = 20_000
_LEFT_OUT = ("bbox",)  # GeoParquet's covering column: a struct, and derivable


class ExportError(ValueError):
    """An export that cannot be made; the message names the region, table or file."""


@dataclass(frozen=True)
class ExportedTable:
    name: str
    rows: int
    spatial: bool
    target: str  # the layer of the GeoPackage, or the file in the folder


@dataclass
class ExportResult:
    path: Path  # the GeoPackage, or the folder
    format: str
    tables: list[ExportedTable] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "asm_sites 2020": not materialised
    empty: list[str] = field(default_factory=list)  # tables with no rows (not written)


def default_output(region_id: str, fmt: str) -> Path:
    """``<region>.gpkg``, or the folder ``<region>-fgb`` / ``<region>-geojson``."""
    return Path(f"{region_id}.gpkg") if fmt == "gpkg" else Path(f"{region_id}-{fmt}")


def export_region(
    root: Path,
    region_id: str,
    periods: Sequence[str],
    fmt: str = "gpkg",
    output: Path | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> ExportResult:
    """Write every table of ``region_id`` for ``periods`` (and its context layers) to
    ``output`` in ``fmt``; ``ExportError`` when the format is unknown or there is
    nothing to export."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")  # fmt: skip
    out = Path(output) if output is not None else default_output(region_id, fmt)
    result = ExportResult(path=out, format=fmt)
    sources: list[tuple[str, list[Path]]] = []
    for name, path_of in PERIOD_TABLES.items():
        files = []
        for period in periods:
            p = path_of(root, region_id, period)
            if p.exists():
                files.append(p)
            else:
                result.missing.append(f"{name} {period}")
        if files:
            sources.append((name, files))
    for kind in CONTEXT_TABLES:
        p = context_table_path(root, region_id, kind)
        if p.exists():
            sources.append((kind, [p]))
    if not sources:
        raise ExportError(
            f"nothing to export for region {region_id!r} under {root} (periods "
            f"{', '.join(periods)}): materialise its assets first (asmwatch run {region_id})"
        )
    if fmt == "gpkg":
        with atomic_path(out, suffix=".tmp.gpkg") as tmp:
            tmp.unlink()  # GDAL creates the GeoPackage itself
            for name, files in sources:
                _write_table(result, name, files, tmp, fmt, layer=name, say=say)
    else:
        with atomic_dir(out) as tmp:
            for name, files in sources:
                _write_table(result, name, files, tmp, fmt, layer=name, say=say)
    return result


def _write_table(
    result: ExportResult,
    name: str,
    files: list[Path],
    target: Path,
    fmt: str,
    layer: str,
    say: Callable[[str], None],
) -> None:
    import pyogrio

    driver, suffix = EXPORT_FORMATS[fmt]
    spatial = _is_spatial(files[0])
    if fmt == "gpkg":
        dest, shown = target, layer
    else:
        dest = target / (f"{name}{suffix}" if spatial else f"{name}.csv")
        shown = dest.name
    kind = _layer_geometry(files) if spatial else None
    rows = 0
    for path in files:
        for frame in _frames(path, spatial):
            if len(frame) == 0:
                continue
            if spatial or fmt == "gpkg":
                # The first chunk creates the layer (a new one in an existing GeoPackage).
                # GeoPackage 1.2, which GDAL 3.6 (Debian's QGIS) reads without a warning;
                # the wheel's GDAL would write 1.4.
                created = fmt == "gpkg" and not dest.exists()
                pyogrio.write_dataframe(
                    frame, dest, layer=layer, driver=driver, append=rows > 0,
                    geometry_type=kind, promote_to_multi=kind is not None and kind.startswith("Multi"),
                    dataset_options={"VERSION": "1.2"} if created else None,
                )  # fmt: skip
            else:
                frame.to_csv(dest, mode="a" if rows else "w", header=rows == 0, index=False)
            rows += len(frame)
    if rows == 0:
        result.empty.append(name)
        return
    result.tables.append(ExportedTable(name, rows, spatial, shown))
    say(f"export {name}: {rows} rows -> {shown}")


def _layer_geometry(files: list[Path]) -> str | None:
    """One geometry type for a layer, from the files' GeoParquet metadata: polygons and
    multipolygons become MultiPolygon (GeoPackage and FlatGeobuf layers have one type,
    and a chunk of polygons must not fix a layer that later gets multipolygons)."""
    kinds: set[str] = set()
    for path in files:
        geo = geo_metadata(path)
        kinds |= {t.removesuffix(" Z") for t in geo["columns"][geo["primary_column"]].get("geometry_types", [])}  # fmt: skip
    for single in ("Polygon", "LineString", "Point"):
        if kinds and kinds <= {single, f"Multi{single}"}:
            return single if kinds == {single} else f"Multi{single}"
    return "Unknown"


def _is_spatial(path: Path) -> bool:
    try:
        geo_metadata(path)
    except GeoTableError:
        return False
    return True


def _frames(path: Path, spatial: bool) -> Iterator[Any]:
    """``path`` a chunk of rows at a time, as (Geo)DataFrames OGR can write."""
    import geopandas as gpd
    import pandas as pd

    source = streamed(path)
    names = [c for c in source.schema_arrow.names if c not in _LEFT_OUT]
    if not spatial:
        for batch in source.iter_batches(batch_size=CHUNK_ROWS, columns=names):
            yield _plain(batch.schema.names, batch.columns, pd)
        return
    primary = geo_metadata(path)["primary_column"]
    others = tuple(c for c in names if c != primary)
    for geoms, columns in read_chunks(path, others, rows=CHUNK_ROWS):
        data = _plain(list(columns), list(columns.values()), pd)
        yield gpd.GeoDataFrame(data, geometry=geoms.values, crs=geoms.crs)


def _plain(names: list[str], columns: list[pa.Array], pd: Any) -> Any:
    """Columns as a DataFrame; lists, structs and maps as JSON text."""
    out = {}
    for name, column in zip(names, columns, strict=True):
        if pa.types.is_nested(column.type):
            out[name] = [
                None if v is None else json.dumps(v, default=str, ensure_ascii=False)
                for v in column.to_pylist()
            ]
        else:
            out[name] = column.to_pandas()
    return pd.DataFrame(out)
