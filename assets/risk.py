"""The risk assets: tables computed by the SQL of sql/ for each region and period.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

import warnings

import dagster as dg

from assets.change import asm_change
from assets.context import context_layers
from assets.detection import asm_sites
from assets.partitions import PARTITIONS, region_and_period
from assets.resources import AsmwatchSettings
from pipelines.catalog import refresh_views
from pipelines.risk import RiskError, compute, write_table

with warnings.catch_warnings():  # beta in Dagster 1.13, and the mapping this graph needs
    warnings.simplefilter("ignore", dg.BetaWarning)
    BY_REGION = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="region")


@dg.asset(
    partitions_def=PARTITIONS,
    group_name="risk",
    kinds={"duckdb", "parquet"},
    owners=["team:asmwatch"],
    deps=[asm_sites, asm_change, dg.AssetDep(context_layers, partition_mapping=BY_REGION)],
    description=(
        "ASM pressure on each protected area and indigenous land of a region in a period "
        "(sql/protected_area_pressure.sql, bound parameters): sites touching it, ASM area "
        "inside it and its share of the area, new ASM area inside it (new and expanded "
        "change), measured in the region's UTM zone. Parquet at "
        "risk/protected_area_pressure/<region>/<period>.parquet and the "
        "`protected_area_pressure` view."
    ),
)
def protected_area_pressure(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings
) -> dg.MaterializeResult:
    region, period = region_and_period(context, settings.regions())
    root = settings.root()
    try:
        rows = compute(root, "protected_area_pressure", region, period.id)
    except RiskError as e:
        raise dg.Failure(description=str(e)) from e
    target = write_table(rows, root, "protected_area_pressure", region.id, period.id)
    views = refresh_views(root)
    table = rows.to_pandas()
    pressed = table[table["site_count"] > 0]
    context.log.info(
        f"protected_area_pressure {region.id} {period.id}: {len(table)} area(s), "
        f"{len(pressed)} with ASM, {table['asm_area_ha'].sum():.1f} ha inside"
    )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(target)),
            "areas": dg.MetadataValue.int(len(table)),
            "areas_with_asm": dg.MetadataValue.int(len(pressed)),
            "asm_area_ha": dg.MetadataValue.float(round(float(table["asm_area_ha"].sum()), 2)),
            "new_asm_ha": dg.MetadataValue.float(round(float(table["new_asm_ha"].sum()), 2)),
            "top": dg.MetadataValue.md(
                pressed.head(5)[
                    ["kind", "area_id", "name", "site_count", "asm_area_ha", "share_of_area"]
                ].to_markdown(index=False)
                if len(pressed)
                else "no ASM on any protected area or indigenous land"
            ),
            "catalog": dg.MetadataValue.json(views),
        }
    )
