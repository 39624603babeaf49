"""The context asset: a region's reference layers as GeoParquet tables and DuckDB views.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

import dagster as dg

from assets.checks import column_schema, nothing_written, results, row_count, specs, table_checks
from assets.partitions import REGIONS, region_of
from assets.resources import AsmwatchSettings, fail_fast
from pipelines.stages.catalog import refresh_views
from pipelines.stages.context import context_for_region


@dg.asset(
    partitions_def=REGIONS,
    group_name="context",
    kinds={"geoparquet", "duckdb"},
    owners=["team:asmwatch"],
    check_specs=specs("context_layers"),
    metadata=column_schema("context"),
    description=(
        "A region's context layers from the files its `context` names: protected areas, "
        "indigenous lands, LSM concessions, settlements, rivers and grievance logs "
        "(GeoJSON, GeoPackage, GeoParquet, zipped Shapefile; CSV with coordinates for "
        "settlements and grievances). Columns mapped through the regions file, CRS "
        "reprojected to EPSG:4326, invalid polygons repaired, anything else refused with "
        "the file and feature named. GeoParquet at `context/<region>/<layer>.parquet` and one "
        "DuckDB view per layer."
    ),
)
@fail_fast
def context_layers(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings
) -> dg.MaterializeResult:
    region = region_of(context, settings.regions())
    root = settings.root()
    done = context_for_region(root, region, context.log.info)
    layers = [layer for layer, _ in done]
    written = {layer.kind: path for layer, path in done}
    for layer in layers:
        for note in layer.notes:
            context.log.warning(f"context {region.id} {layer.kind}: {note}")
        context.log.info(
            f"context {region.id} {layer.kind}: {len(layer.frame)} feature(s) from {layer.path}"
        )
    views = refresh_views(root, say=context.log.warning, regions=settings.regions().ids)
    tables = [("context", path, kind) for kind, path in written.items()]
    return dg.MaterializeResult(
        check_results=table_checks(tables, region, context.log)
        if tables
        else results(nothing_written(f"region {region.id} lists no context layers"), region.id),
        metadata={
            "layers": (
                {
                    layer.kind: {
                        "features": len(layer.frame),
                        "area_ha": round(float(layer.frame["area_ha"].sum()), 2),
                        "file": str(layer.path),
                        "notes": layer.notes,
                    }
                    for layer in layers
                }
            ),
            **{f"{layer.kind}_count": len(layer.frame) for layer in layers},
            **row_count(*written.values()),
            "catalog": views,
        },
    )
