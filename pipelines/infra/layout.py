"""Where everything lives under a data root: the one owner of the layout.

Every table, raster and report of a partition has one path, built here and nowhere
else, so a stage that reads another stage's output imports this module, not that stage
(``detection`` reads composites without importing the composite stage). The data root's
shape::

    scenes/<region>/<period>.parquet            STAC items (stac-geoparquet)
    composite/<region>/<period>.tif             median composite (COG)
    probability/<region>/<period>.tif           mining probability (COG)
    sites/<region>/<period>.parquet             ASM sites (GeoParquet)
    change/<region>/<period>.parquet            change areas (GeoParquet)
    summary/<region>/<period>.parquet           region_summary rows
    risk/<table>/<region>/<period>.parquet      concession_risk, protected_area_pressure,
                                                hotspots, alerts
    context/<region>/<layer>.parquet            context layers (GeoParquet)
    reports/<region>/                           report.html, webmap.html, expansion.png
    models/                                     the model registry
    embedded/<region>/                          the simulated world of an embedded region
    asmwatch.duckdb                             the catalog (views over the tables)

Every name is checked (``pipelines.infra.storage.confined``): no id can reach outside the
root. ``TEMPLATES`` gives the same shapes as text, for code that lists them (doctor's
expected files).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.infra.storage import confined, partition_path

CATALOG_FILE = "asmwatch.duckdb"
#: The tables under ``risk/<table>/`` (``alert_features`` is written with ``alerts``).
RISK_TABLES = ("concession_risk", "protected_area_pressure", "hotspots", "alerts", "alert_features")
MODELS_DIR = "models"

#: Each partitioned file, relative to the data root (``{table}`` for the risk tables).
TEMPLATES: dict[str, str] = {
    "scenes": "scenes/{region}/{period}.parquet",
    "composite": "composite/{region}/{period}.tif",
    "probability": "probability/{region}/{period}.tif",
    "sites": "sites/{region}/{period}.parquet",
    "change": "change/{region}/{period}.parquet",
    "summary": "summary/{region}/{period}.parquet",
    "risk": "risk/{table}/{region}/{period}.parquet",
    "context": "context/{region}/{layer}.parquet",
    "reports": "reports/{region}",
}


def scenes_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "scenes", region_id, period_id, ".parquet")


def composite_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "composite", region_id, period_id, ".tif")


def probability_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "probability", region_id, period_id, ".tif")


def sites_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "sites", region_id, period_id, ".parquet")


def change_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "change", region_id, period_id, ".parquet")


def summary_path(root: Path, region_id: str, period_id: str) -> Path:
    return partition_path(root, "summary", region_id, period_id, ".parquet")


def risk_path(root: Path, table: str, region_id: str, period_id: str) -> Path:
    return confined(root, "risk", table, region_id, f"{period_id}.parquet", names=(table, region_id, period_id))  # fmt: skip


def context_table_path(root: Path, region_id: str, kind: str) -> Path:
    return confined(root, "context", region_id, f"{kind}.parquet", names=(region_id, kind))


def report_dir(root: Path, region_id: str) -> Path:
    return confined(root, "reports", region_id)
