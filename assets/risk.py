"""The risk assets: tables computed by the SQL of sql/ for each region and period.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

from collections.abc import Callable
from typing import Any

import dagster as dg

from assets.change import asm_change
from assets.checks import column_schema, row_count, specs, table_checks
from assets.context import context_layers
from assets.detection import asm_sites
from assets.partitions import REGION_PERIODS, region_and_period
from assets.resources import AsmwatchSettings, fail_fast
from pipelines.infra.layout import risk_path
from pipelines.stages.catalog import refresh_views
from pipelines.stages.risk import (
    DEFAULT_ALERT_DISTANCE_M,
    DEFAULT_H3_RESOLUTION,
    DEFAULT_MAX_ALERTS,
    DEFAULT_MIN_ALERT_HA,
    RiskError,
    RiskSettings,
    write_rows,
)

#: A region's tables (region|period) and its region-only assets (context layers,
#: reports): Dagster maps between two single-dimension dynamic partition sets only as
#: identity or "all", so the lineage says "all"; the assets read their own region's files
#: (docs/automation.md, "Partitions").
BY_REGION = dg.AllPartitionMapping()
DEPS: list[dg.AssetsDefinition | dg.AssetDep] = [
    asm_sites,
    asm_change,
    dg.AssetDep(context_layers, partition_mapping=BY_REGION),
]


class RiskConfig(dg.Config):
    """Thresholds of the risk tables (run config; defaults suit 10 m Sentinel-2 sites)."""

    alert_distance_m: float = DEFAULT_ALERT_DISTANCE_M  # new ASM this close to a concession
    h3_resolution: int = DEFAULT_H3_RESOLUTION  # hotspot cells (7: about 5 km2)
    min_alert_ha: float = DEFAULT_MIN_ALERT_HA  # smaller new areas raise no alert
    max_alerts: int = DEFAULT_MAX_ALERTS  # alerts listed per period (report, map); all kept


def _run(
    table: str,
    context: dg.AssetExecutionContext,
    settings: AsmwatchSettings,
    config: RiskConfig,
    summary: Callable[[Any, Callable[[str], dict[Any, Any]]], dict[str, Any]],
) -> dg.MaterializeResult:
    """Compute one table for the partition, write it, refresh the views, report."""
    region, period = region_and_period(context, settings.regions())
    root = settings.root()
    try:
        target = write_rows(
            root,
            table,
            region,
            period.id,
            RiskSettings(
                config.alert_distance_m,
                config.h3_resolution,
                config.min_alert_ha,
                config.max_alerts,
            ),
        )
    except RiskError as e:
        raise dg.Failure(allow_retries=False, description=str(e)) from e
    views = refresh_views(root, say=context.log.warning, regions=settings.regions().ids)
    # The summary reads the file back a few columns and rows at a time (it may be large).
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(target)
    n = pf.metadata.num_rows
    names = [c for c in pf.schema_arrow.names if c not in ("geometry", "bbox")]
    if table == "alerts":  # may be millions of rows: the most severe five (file order)
        head = next(pf.iter_batches(batch_size=5, columns=names), None)
        df = head.to_pandas() if head is not None else pq.read_table(target, columns=names).to_pandas()  # fmt: skip
    else:  # a row per concession, protected area or cell, without geometries
        df = pq.read_table(target, columns=names).to_pandas()
    context.log.info(f"{table} {region.id} {period.id}: {n} row(s) -> {target}")
    checked: list[tuple[str, Any, str | None]] = [(table, target, None)]
    if table == "alerts":  # written together with what raised each alert
        checked.append(("alert_features", risk_path(root, "alert_features", region.id, period.id), None))  # fmt: skip
    return dg.MaterializeResult(
        check_results=table_checks(checked, region, context.log, f"{region.id} {period.id}"),
        metadata={
            "path": dg.MetadataValue.path(str(target)),
            **row_count(target),
            **summary(df, lambda column: _counts(pf, column)),
            "catalog": views,
        },
    )


def _counts(pf: Any, column: str) -> dict[Any, Any]:
    """Value counts of one column, a row group at a time."""
    from collections import Counter

    import pyarrow.compute as pc

    counts: Counter[Any] = Counter()
    for batch in pf.iter_batches(columns=[column]):  # counted in Arrow, not row by row
        for pair in pc.value_counts(batch.column(0)).to_pylist():
            counts[pair["values"]] += pair["counts"]
    return dict(counts)


def _md(df: Any, columns: list[str], empty: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(df[columns].head(5).to_markdown(index=False) if len(df) else empty)


@dg.asset(
    partitions_def=REGION_PERIODS, group_name="risk", kinds={"duckdb", "parquet"},
    owners=["team:asmwatch"], deps=DEPS, check_specs=specs("concession_risk"),
    metadata=column_schema("concession_risk"),
    description=(
        "ASM-LSM conflict risk per concession (sql/concession_risk.sql): ASM inside and "
        "at 0-1, 1-5 and 5-10 km, new ASM, growth against the previous period, nearest "
        "ASM, settlements and indigenous lands within 5 km, open grievances; a 0-100 score "
        "with each component stored beside it (docs/risk.md) and a band."
    ),
)  # fmt: skip
@fail_fast
def concession_risk(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings, config: RiskConfig
) -> dg.MaterializeResult:
    def summary(df: Any, _counts: Callable[[str], dict[Any, Any]]) -> dict[str, Any]:
        bands = df["band"].value_counts().to_dict() if len(df) else {}
        return {
            "bands": {k: int(v) for k, v in bands.items()},
            "max_score": float(df["score"].max()) if len(df) else 0.0,
            "top": _md(
                df,
                [
                    "concession_id",
                    "name",
                    "score",
                    "band",
                    "score_inside",
                    "score_proximity",
                    "score_new",
                    "score_growth",
                    "score_people",
                    "score_grievances",
                ],
                "no concessions",
            ),
        }

    return _run("concession_risk", context, settings, config, summary)


@dg.asset(
    partitions_def=REGION_PERIODS, group_name="risk", kinds={"duckdb", "parquet"},
    owners=["team:asmwatch"], deps=DEPS, check_specs=specs("protected_area_pressure"),
    metadata=column_schema("protected_area_pressure"),
    description=(
        "ASM pressure on each protected area and indigenous land of a region in a period "
        "(sql/protected_area_pressure.sql): sites touching it, ASM area inside it and its "
        "share of the area, new ASM area inside it, in the region's UTM zone."
    ),
)  # fmt: skip
@fail_fast
def protected_area_pressure(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings, config: RiskConfig
) -> dg.MaterializeResult:
    def summary(df: Any, _counts: Callable[[str], dict[Any, Any]]) -> dict[str, Any]:
        pressed = df[df["site_count"] > 0] if len(df) else df
        return {
            "areas": len(df),
            "areas_with_asm": len(pressed),
            "asm_area_ha": float(round(float(df["asm_area_ha"].sum()), 2) if len(df) else 0.0),
            "new_asm_ha": float(round(float(df["new_asm_ha"].sum()), 2) if len(df) else 0.0),
            "top": _md(
                pressed,
                ["kind", "area_id", "name", "site_count", "asm_area_ha", "share_of_area"],
                "no ASM on any protected area or indigenous land",
            ),
        }

    return _run("protected_area_pressure", context, settings, config, summary)


@dg.asset(
    partitions_def=REGION_PERIODS, group_name="risk", kinds={"duckdb", "geoparquet"},
    owners=["team:asmwatch"], deps=DEPS, check_specs=specs("hotspots"),
    metadata=column_schema("hotspots"),
    description=(
        "H3 cells (resolution 7 by default) with their ASM area, new ASM area and site "
        "count (sql/hotspots.sql; the h3 package's cells), as GeoParquet with cell polygons."
    ),
)  # fmt: skip
@fail_fast
def hotspots(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings, config: RiskConfig
) -> dg.MaterializeResult:
    def summary(df: Any, _counts: Callable[[str], dict[Any, Any]]) -> dict[str, Any]:
        return {
            "cells": len(df),
            "top": _md(df, ["h3_cell", "asm_area_ha", "new_asm_ha", "site_count"], "no ASM"),
        }

    return _run("hotspots", context, settings, config, summary)


@dg.asset(
    partitions_def=REGION_PERIODS, group_name="risk", kinds={"duckdb", "geoparquet"},
    owners=["team:asmwatch"], deps=DEPS, check_specs=specs("alerts"),
    metadata=column_schema("alerts"),
    description=(
        "Early-warning alerts (sql/alerts.sql), one per new or expanded ASM area (the event "
        "a person acts on): inside or within `alert_distance_m` of a concession, or inside a "
        "protected area or indigenous land. Each lists every feature it touches with its "
        "relation (`summary`, in words), takes the severity of the most serious one, and "
        "has a reference (`alert_ref`, `<period>-<rank>`); they are ranked by severity, then "
        "area, and the first `max_alerts` are `listed` in the report and on the map (the "
        "rest are counted there). Changes below the minimum mapping unit raise none. What "
        "raised each alert, feature by feature, goes to the `alert_features` table, written "
        "with it. Ids are digests of the change area and a re-run replaces the period, so "
        "alerts never duplicate."
    ),
)  # fmt: skip
@fail_fast
def alerts(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings, config: RiskConfig
) -> dg.MaterializeResult:
    def summary(df: Any, counts: Callable[[str], dict[Any, Any]]) -> dict[str, Any]:
        sev = counts("severity")
        listed = counts("listed")
        return {
            "severity": {k: int(v) for k, v in sev.items()},
            "listed": int(listed.get(True, 0)),
            "not_listed": int(listed.get(False, 0)),
            "latest": _md(df, ["alert_ref", "severity", "area_ha", "summary"], "no alerts"),
        }

    return _run("alerts", context, settings, config, summary)


RISK_ASSETS = [concession_risk, protected_area_pressure, hotspots, alerts]
