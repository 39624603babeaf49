"""The risk stage: the SQL of sql/ run over the catalog's views, one region and period at
a time, and its rows written as (Geo)Parquet tables the catalog exposes as views.

Each table is one SQL file (``sql/<table>.sql``). It takes bound parameters only
(``$region``, ``$period``, ``$utm`` and the few its header lists), so no value from a
regions file or a context layer is ever pasted into SQL text. Areas and distances are
measured in the region's UTM zone, the CRS the composites and sites use. A region without
some context layer gets an empty stand-in view of the same columns: concession risk for
a region with no settlements layer simply counts none.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import thresholds
from pipelines.infra.geotable import recorded, with_metadata
from pipelines.infra.grid import bbox_utm_epsg
from pipelines.infra.layout import RISK_TABLES, risk_path
from pipelines.infra.storage import atomic_path
from pipelines.regions import Region
from pipelines.stages.catalog import load_sql, open_catalog

TABLES = RISK_TABLES
#: Tables with a WKB ``geometry`` in their SQL's result (GeoParquet when written).
GEO_TABLES = ("alerts", "alert_features")
NEEDS: dict[str, tuple[str, ...]] = {
    "concession_risk": (
        "asm_sites",
        "asm_change",
        "concessions",
        "settlements",
        "indigenous_lands",
        "grievances",
    ),
    "protected_area_pressure": ("asm_sites", "asm_change", "protected_areas", "indigenous_lands"),
    "hotspots": ("asm_sites", "asm_change"),
    "alerts": ("asm_change", "concessions", "protected_areas", "indigenous_lands"),
    "alert_features": ("asm_change", "concessions", "protected_areas", "indigenous_lands"),
}
#: Alerts most severe first (the order sql/alerts.sql writes them in).
SEVERITY_ORDER = "CASE severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 ELSE 2 END"
DEFAULT_ALERT_DISTANCE_M = thresholds.ALERT_DISTANCE_M
DEFAULT_H3_RESOLUTION = 7
DEFAULT_MIN_ALERT_HA = thresholds.MIN_ALERT_HA  # the sites' minimum mapping unit
DEFAULT_MAX_ALERTS = thresholds.MAX_ALERTS_LISTED

# Column stand-ins for views a region lacks (names and types as the real views have).
_CONTEXT = (
    "NULL::VARCHAR AS region, NULL::VARCHAR AS layer, NULL::VARCHAR AS feature_id, "
    "NULL::VARCHAR AS name, NULL::VARCHAR AS category, NULL::DOUBLE AS area_ha, "
    "NULL::VARCHAR AS holder, NULL::VARCHAR AS status, NULL::DOUBLE AS population, "
    "NULL::DATE AS date, NULL::VARCHAR AS place, NULL::VARCHAR AS concession_id"
)
_EMPTY = "ST_GeomFromText('POLYGON EMPTY') AS geometry"
STAND_INS = {
    "asm_sites": "NULL::VARCHAR AS region, NULL::VARCHAR AS period, NULL::VARCHAR AS site_id, NULL::DOUBLE AS area_ha",
    "asm_change": "NULL::VARCHAR AS region, NULL::VARCHAR AS period, NULL::VARCHAR AS kind, NULL::VARCHAR AS change_id, NULL::DOUBLE AS area_ha",
    **{
        v: _CONTEXT
        for v in ("concessions", "settlements", "indigenous_lands", "protected_areas", "grievances")
    },
}


#: Keys of the alerts files' Parquet key-value metadata that record the settings they were
#: computed with (a run may set others than the defaults), for the report to state.
SETTING_KEYS = {"alert_distance_m": "asmwatch:alert_distance_m", "min_alert_ha": "asmwatch:min_alert_ha"}  # fmt: skip
#: The tables whose rows those settings decide.
SETTING_TABLES = ("alerts", "alert_features")


def recorded_settings(path: Path) -> dict[str, float]:
    """The settings an alerts file records it was computed with (``SETTING_KEYS``), by
    name; empty for a file that records none (written before they were recorded)."""
    found = recorded(path, SETTING_KEYS.values())
    return {k: found[key] for k, key in SETTING_KEYS.items() if key in found}


class RiskError(ValueError):
    """A risk table that cannot be computed; the message says what is missing."""


@dataclass(frozen=True)
class RiskSettings:
    alert_distance_m: float = DEFAULT_ALERT_DISTANCE_M
    h3_resolution: int = DEFAULT_H3_RESOLUTION
    min_alert_ha: float = DEFAULT_MIN_ALERT_HA
    max_alerts: int = DEFAULT_MAX_ALERTS  # listed per period; the rest counted


def _h3_function(con: Any) -> None:
    """Register ``h3_cell(lat, lon, resolution)``, the h3 package's latlng_to_cell."""
    import h3
    import pyarrow as pa
    from duckdb import sqltypes

    def h3_cell(lat: Any, lon: Any, res: Any) -> Any:
        cells = [
            h3.latlng_to_cell(y, x, r) if y is not None and x is not None else None
            for y, x, r in zip(lat.to_pylist(), lon.to_pylist(), res.to_pylist(), strict=True)
        ]
        return pa.array(cells, pa.string())

    con.create_function(
        "h3_cell", h3_cell, [sqltypes.DOUBLE, sqltypes.DOUBLE, sqltypes.INTEGER],
        sqltypes.VARCHAR, type="arrow", null_handling="special",
    )  # fmt: skip


def parameters(
    table: str, region: Region, period_id: str, settings: RiskSettings, now: dt.datetime
) -> dict[str, Any]:
    """The bound parameters the table's SQL names, and no others."""
    period = region.period(period_id)
    previous = region.previous_period(period_id)
    values: dict[str, Any] = {
        "region": region.id,
        "period": period_id,
        "previous": previous.id if previous else None,
        "period_end": period.end,
        "utm": f"EPSG:{bbox_utm_epsg(region.bbox)}",
        "alert_distance_m": float(settings.alert_distance_m),
        "min_alert_ha": float(settings.min_alert_ha),
        "created_at": now,
        "resolution": int(settings.h3_resolution),
        "max_alerts": int(settings.max_alerts),
        **thresholds.sql_parameters(),
    }
    used = set(re.findall(r"\$([a-z_]+)", load_sql(table)))
    unknown = used - set(values)
    if unknown:
        raise RiskError(f"sql/{table}.sql names unknown parameters: {', '.join(sorted(unknown))}")
    return {k: v for k, v in values.items() if k in used}


@contextlib.contextmanager
def _prepared(
    root: Path,
    table: str,
    region: Region,
    period_id: str,
    settings: RiskSettings | None,
    now: dt.datetime | None,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A catalog connection ready for ``sql/<table>.sql`` and its bound parameters."""
    if table not in TABLES:
        raise RiskError(f"unknown risk table {table!r} (known: {', '.join(TABLES)})")
    settings = settings or RiskSettings()
    if not 0 < settings.alert_distance_m <= 100_000:
        raise RiskError("alert distance must be between 0 and 100 km")
    if not 0 <= settings.h3_resolution <= 15:
        raise RiskError("H3 resolution must be 0 to 15")
    if settings.max_alerts < 1:
        raise RiskError(f"max_alerts must be at least 1 (alerts listed per period), got {settings.max_alerts}")  # fmt: skip
    now = now or dt.datetime.now(dt.UTC)  # one stamp for every table of this computation
    params = parameters(table, region, period_id, settings, now)
    con = open_catalog(root)
    try:
        have = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        for view in NEEDS[table]:
            if view not in have:  # names from this module, never input
                con.execute(
                    f"CREATE TEMP VIEW {view} AS SELECT {STAND_INS[view]}, {_EMPTY} WHERE false"
                )
        if table == "hotspots":
            _h3_function(con)
        if table == "alerts":  # its rows group the relations of sql/alert_features.sql
            relations = load_sql("alert_features").strip().rstrip(";")
            feature_params = parameters("alert_features", region, period_id, settings, now)
            con.execute(f"CREATE TEMP TABLE alert_relations AS {relations}", feature_params)
        yield con, params
    finally:
        con.close()


def compute(
    root: Path,
    table: str,
    region: Region,
    period_id: str,
    settings: RiskSettings | None = None,
    now: dt.datetime | None = None,
) -> Any:
    """The rows of ``table`` for one region and period, as a pyarrow Table (in memory:
    for small results and tests; the assets write with ``write_rows``)."""
    with _prepared(root, table, region, period_id, settings, now) as (con, params):
        return con.execute(load_sql(table), params).to_arrow_table()


def write_rows(
    root: Path,
    table: str,
    region: Region,
    period_id: str,
    settings: RiskSettings | None = None,
    now: dt.datetime | None = None,
) -> Path:
    """Compute ``table`` for one region and period and write it, streaming.

    DuckDB runs the SQL and writes the Parquet file itself (``COPY ... TO``), row group
    by row group: memory is bounded by ``catalog.MEMORY_LIMIT`` (DuckDB spills beyond it), not
    by the size of the result, and no column ever passes through Arrow's 2 GiB arrays.
    ``alerts`` writes ``alert_features`` beside it, both from one computation of the
    relations, and both are replaced together. Their WKB becomes a GeoParquet geometry
    column (EPSG:4326, as every other table's) with a bbox covering column. Hotspots, whose cell polygons
    come from the h3 package, are written from memory (one row per cell).
    """
    if table == "hotspots":
        rows = compute(root, table, region, period_id, settings, now)
        return write_table(rows, root, table, region.id, period_id)
    if table == "alert_features":
        raise RiskError("alert_features is written with alerts: write_rows(..., 'alerts', ...)")
    import pyarrow.parquet as pq

    from pipelines.stages.catalog import sql_literal

    # Alerts and their companion table come from one computation of the relations (the
    # temporary table alert_relations), and are replaced together.
    bodies = {table: load_sql(table).strip().rstrip(";")}
    if table == "alerts":
        bodies = {"alert_features": "SELECT * FROM alert_relations", **bodies}
    now = now or dt.datetime.now(dt.UTC)
    targets = {t: risk_path(root, t, region.id, period_id) for t in bodies}
    chosen = settings or RiskSettings()
    record = {key: repr(float(getattr(chosen, k))) for k, key in SETTING_KEYS.items()}
    empty: list[str] = []
    with contextlib.ExitStack() as stack:
        con, params = stack.enter_context(_prepared(root, table, region, period_id, settings, now))
        for name, body in bodies.items():
            tmp = stack.enter_context(atomic_path(targets[name]))
            if name in GEO_TABLES:  # WKB in the SQL's result: GeoParquet geometry and bbox
                body = (
                    "SELECT * EXCLUDE (geometry, g), g AS geometry, struct_pack(xmin := ST_XMin(g), "
                    "ymin := ST_YMin(g), xmax := ST_XMax(g), ymax := ST_YMax(g)) AS bbox "
                    f"FROM (SELECT *, ST_SetCRS(ST_GeomFromWKB(geometry), 'EPSG:4326') AS g FROM ({body}))"
                )
            used = params if name == table else {}
            kv = ""
            if name in SETTING_TABLES:
                kv = ", KV_METADATA {" + ", ".join(f'"{k}": {sql_literal(v)}' for k, v in record.items()) + "}"  # fmt: skip
            con.execute(f"COPY ({body}) TO {sql_literal(str(tmp))} (FORMAT parquet, ROW_GROUP_SIZE 100000{kv})", used)  # fmt: skip
            if name in GEO_TABLES and pq.read_metadata(tmp).num_rows == 0:
                empty.append(name)
    for name in empty:
        # DuckDB writes no GeoParquet metadata for an empty result; readers would see a
        # BLOB. Nothing to stream: the in-memory writer makes the same empty table.
        write_table(
            compute(root, name, region, period_id, settings, now), root, name, region.id,
            period_id, metadata=record if name in SETTING_TABLES else None,
        )  # fmt: skip
    return targets[table]


def write_table(
    rows: Any,
    root: Path,
    table: str,
    region_id: str,
    period_id: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """(Geo)Parquet, atomically; re-running a period replaces its rows, never adds to them.

    Tables with a WKB ``geometry`` column (alerts) become GeoParquet in EPSG:4326 with a
    bbox covering column; hotspots get their H3 cell polygons. ``metadata`` joins the
    file's key-value metadata (``SETTING_KEYS``).
    """
    import pyarrow.parquet as pq

    target = risk_path(root, table, region_id, period_id)
    frame = None
    if "geometry" in rows.column_names:
        import geopandas as gpd

        df = rows.to_pandas()
        frame = gpd.GeoDataFrame(
            df.drop(columns="geometry"), geometry=gpd.GeoSeries.from_wkb(df["geometry"]), crs=4326
        )
    elif table == "hotspots":
        import geopandas as gpd
        import h3
        import shapely

        df = rows.to_pandas()
        cells = [
            shapely.Polygon([(lon, lat) for lat, lon in h3.cell_to_boundary(c)])
            for c in df["h3_cell"]
        ]
        frame = gpd.GeoDataFrame(df, geometry=cells, crs=4326)
    with atomic_path(target) as tmp:
        if frame is not None:
            frame.to_parquet(tmp, write_covering_bbox=True, index=False)
            _keep_types(tmp, rows.schema, metadata)
        else:
            pq.write_table(with_metadata(rows, metadata), tmp)
    return target


def _keep_types(path: Path, schema: Any, metadata: dict[str, str] | None = None) -> None:
    """Give columns that went through pandas empty (typed ``null``: an empty list column
    has no element to infer from) their SQL types back, keeping the GeoParquet metadata
    and adding ``metadata``; the file is rewritten only if either changes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    fixed = table
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type) and f.name in schema.names and f.name != "geometry":
            want = schema.field(f.name).type
            fixed = fixed.set_column(i, pa.field(f.name, want), pa.nulls(len(table), want))
    if fixed is not table or metadata:
        pq.write_table(with_metadata(fixed.replace_schema_metadata(table.schema.metadata), metadata), path)  # fmt: skip
