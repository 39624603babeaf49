"""The ``scenes`` asset: Sentinel-2 L2A scenes of a region and period, normalised.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

from pathlib import Path

import dagster as dg

from assets.checks import column_schema, nothing_written, results, row_count, specs, table_checks
from assets.partitions import REGION_PERIODS, region_and_period
from assets.resources import NETWORK_RETRY, AsmwatchSettings, StacResource, fail_fast
from pipelines.stages.catalog import refresh_views
from pipelines.stages.scenes import find_scenes


@dg.asset(
    partitions_def=REGION_PERIODS,
    group_name="ingest",
    kinds={"stac", "geoparquet", "duckdb"},
    owners=["team:asmwatch"],
    check_specs=specs("scenes"),
    metadata=column_schema("scenes"),
    retry_policy=NETWORK_RETRY,
    description=(
        "Sentinel-2 L2A scenes over the region's AOI in the period, from its STAC source "
        "(Earth Search, Planetary Computer, any STAC API or the embedded demo server): "
        "cloud-filtered, normalised (asset roles, scale/offset, processing baseline) and "
        "with reprocessing twins dropped. Lands as stac-geoparquet at "
        "`scenes/<region>/<period>.parquet` and as the `scenes` view of the DuckDB catalog."
    ),
)
@fail_fast
def scenes(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings, stac: StacResource
) -> dg.MaterializeResult:
    config = settings.regions()
    region, period = region_and_period(context, config)
    root = settings.root()
    url = stac.url_for(region, root, log=context.log)
    out = find_scenes(url, region, period, root, progress=context.log.info)
    views = refresh_views(root, say=context.log.warning, regions=settings.regions().ids)
    s = out.summary()
    context.log.info(
        f"{region.id} {period.id}: {out.count} scenes kept of {s['returned']} returned "
        f"({s['dropped']} dropped, {s['too_cloudy']} too cloudy)"
    )
    rows = "\n".join(
        f"| {sc.id} | {sc.datetime:%Y-%m-%d} | {sc.mgrs_tile} | "
        f"{sc.cloud_cover if sc.cloud_cover is not None else '?'} | {sc.processing_baseline} |"
        for sc in out.result.scenes
    )
    checks = (
        table_checks(
            [("scenes", Path(s["path"]), None)], region, context.log, f"{region.id} {period.id}"
        )
        if s["path"]
        else results(
            nothing_written("no scenes in the period: nothing written"), f"{region.id} {period.id}"
        )
    )
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            **row_count(Path(s["path"]) if s["path"] else None),
            "scene_count": int(out.count),
            "returned": int(s["returned"]),
            "dropped": int(s["dropped"]),
            "too_cloudy": int(s["too_cloudy"]),
            "empty": bool(out.count == 0),
            "cloud_cover": s["cloud_cover"],
            "tiles": s["tiles"],
            "baselines": s["baselines"],
            "server_side_filter": bool(s["server_filter"]),
            "l1c_twins": int(s["l1c_twins"]),
            "l1c_unmatched": s["l1c_unmatched"],
            "stac_source": str(region.source),
            "path": dg.MetadataValue.path(s["path"] or "(no scenes)"),
            "catalog": views,
            "scenes": dg.MetadataValue.md(
                "| id | date | tile | cloud % | baseline |\n|---|---|---|---|---|\n" + rows
                if rows
                else "_no scenes in this period_"
            ),
        },
    )
