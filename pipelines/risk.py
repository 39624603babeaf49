"""The risk stage: the SQL of sql/ run over the catalog's views, one region and period at
a time, and its rows written as Parquet tables the catalog exposes as views.

Each table is one SQL file (``sql/<table>.sql``) that takes bound parameters only
(``$region``, ``$period``, ``$utm``): no value from a regions file or a context layer
is ever pasted into SQL text. Areas are measured in the region's UTM zone, the CRS the
composites and sites use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.catalog import CATALOG_FILE, connect, load_sql
from pipelines.grid import bbox_utm_epsg
from pipelines.regions import Region
from pipelines.storage import atomic_path

TABLES = ("protected_area_pressure",)


class RiskError(ValueError):
    """A risk table that cannot be computed; the message says what is missing."""


def risk_path(root: Path, table: str, region_id: str, period_id: str) -> Path:
    return root / "risk" / table / region_id / f"{period_id}.parquet"


def needed_views(table: str) -> tuple[str, ...]:
    return {
        "protected_area_pressure": (
            "asm_sites",
            "asm_change",
            "protected_areas",
            "indigenous_lands",
        ),
    }[table]


def compute(root: Path, table: str, region: Region, period_id: str) -> Any:
    """The rows of ``table`` for one region and period, as a pyarrow Table."""
    if table not in TABLES:
        raise RiskError(f"unknown risk table {table!r} (known: {', '.join(TABLES)})")
    db = root / CATALOG_FILE
    if not db.exists():
        raise RiskError(f"no catalog at {db}: materialise asm_sites and context_layers first")
    con = connect(db, read_only=True)
    try:
        have = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        missing = [v for v in needed_views(table) if v not in have]
        for view in missing:  # an absent layer is an empty one: the same columns, no rows
            con.execute(f"CREATE TEMP VIEW {view} AS {_empty(view)}")  # names from code
        params = {"region": region.id, "period": period_id, "utm": f"EPSG:{bbox_utm_epsg(region.bbox)}"}  # fmt: skip
        return con.execute(load_sql(table), params).to_arrow_table()
    finally:
        con.close()


def _empty(view: str) -> str:
    """A query with a view's columns and no rows, for layers a region does not have."""
    geometry = "ST_GeomFromText('POLYGON EMPTY')"
    if view in ("protected_areas", "indigenous_lands"):
        return (
            "SELECT NULL::VARCHAR AS region, NULL::VARCHAR AS feature_id, NULL::VARCHAR AS name, "
            f"NULL::VARCHAR AS category, NULL::DOUBLE AS area_ha, {geometry} AS geometry WHERE false"
        )
    if view == "asm_change":
        return (
            "SELECT NULL::VARCHAR AS region, NULL::VARCHAR AS period, NULL::VARCHAR AS kind, "
            f"NULL::VARCHAR AS change_id, {geometry} AS geometry WHERE false"
        )
    return (
        "SELECT NULL::VARCHAR AS region, NULL::VARCHAR AS period, NULL::VARCHAR AS site_id, "
        f"NULL::DOUBLE AS area_ha, {geometry} AS geometry WHERE false"
    )


def write_table(rows: Any, root: Path, table: str, region_id: str, period_id: str) -> Path:
    """Parquet, atomically; re-running a period replaces its rows, never adds to them."""
    import pyarrow.parquet as pq

    target = risk_path(root, table, region_id, period_id)
    with atomic_path(target) as tmp:
        pq.write_table(rows, tmp)
    return target
