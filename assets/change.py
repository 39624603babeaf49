"""The change asset: ``asm_change`` and the ``region_summary`` table.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

import dagster as dg

from assets.checks import column_schema, row_count, specs, table_checks
from assets.composite import composite
from assets.detection import asm_sites
from assets.partitions import REGION_PERIODS, missing_partition, region_and_period
from assets.resources import AsmwatchSettings, fail_fast
from pipelines.infra.errors import MissingInputError
from pipelines.stages.catalog import refresh_views
from pipelines.stages.change import KINDS, change_for_period
from pipelines.thresholds import NDVI_RECOVERED, number


@dg.asset(
    partitions_def=REGION_PERIODS,
    group_name="change",
    kinds={"geoparquet", "duckdb"},
    owners=["team:asmwatch"],
    deps=[asm_sites, composite],
    check_specs=specs("asm_change"),
    metadata=column_schema("asm_change"),
    description=(
        "Period-over-period ASM change for a region: new, expanded, stable, abandoned and "
        f"re-vegetating areas (re-vegetation: mean composite NDVI >= {number(NDVI_RECOVERED)} on land mined the "
        "period before), with first_seen_period. Needs asm_sites of this and the previous "
        "period of the region (materialise periods in order). GeoParquet at "
        "`change/<region>/<period>.parquet` and the `asm_change` view; one row per region "
        "and period in the `region_summary` view (mining area, change by kind, growth "
        "against the previous and the first period)."
    ),
)
@fail_fast
def asm_change(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings
) -> dg.MaterializeResult:
    region, period = region_and_period(context, settings.regions())
    root = settings.root()
    try:
        done = change_for_period(
            root,
            region,
            period.id,
            progress=lambda m: context.log.info(f"asm_change {region.id} {m}"),
        )
    except MissingInputError as e:
        raise missing_partition(context, str(e)) from e
    table, summary, target = done.table, done.summary, done.table.path
    views = refresh_views(root, say=context.log.warning, regions=settings.regions().ids)
    s = summary
    context.log.info(
        f"asm_change {region.id} {period.id}: mining {s['mining_ha']:.1f} ha, "
        + ", ".join(f"{k} {s[f'{k}_ha']:.1f}" for k in KINDS)
        + f"; growth vs previous {s['growth_vs_previous']}, vs first {s['growth_vs_first']}"
    )
    for note in table.notes:
        context.log.info(f"asm_change {region.id} {period.id}: {note}")

    def num(v: float | None) -> float | None:
        return float(v) if v is not None else None

    tables = [("asm_change", target, None), ("region_summary", done.summary_path, None)]
    return dg.MaterializeResult(
        check_results=table_checks(tables, region, context.log, f"{region.id} {period.id}"),
        metadata={
            "path": dg.MetadataValue.path(str(target)),
            **row_count(target),
            "mining_ha": num(s["mining_ha"]),
            **{f"{k}_ha": num(s[f"{k}_ha"]) for k in KINDS},
            "growth_vs_previous": num(s["growth_vs_previous"]),
            "growth_vs_first": num(s["growth_vs_first"]),
            "previous_period": str(s["previous_period"] or "none"),
            "notes": str(s["notes"] or "none"),
            "catalog": views,
        },
    )
