"""The change asset: ``asm_change`` and the ``region_summary`` table.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

import dagster as dg

from assets.checks import column_schema, row_count, specs, table_checks
from assets.composite import composite
from assets.detection import asm_sites
from assets.partitions import PARTITIONS, missing_partition, region_and_period
from assets.resources import AsmwatchSettings, fail_fast
from pipelines.catalog import refresh_views
from pipelines.change import (
    KINDS,
    change_path,
    change_table,
    mining_ha,
    summarise,
    summary_path,
    write_summary,
)
from pipelines.composite import composite_path
from pipelines.sites import sites_path


@dg.asset(
    partitions_def=PARTITIONS,
    group_name="change",
    kinds={"geoparquet", "duckdb"},
    owners=["team:asmwatch"],
    deps=[asm_sites, composite],
    check_specs=specs("asm_change"),
    metadata=column_schema("asm_change"),
    description=(
        "Period-over-period ASM change for a region: new, expanded, stable, abandoned and "
        "re-vegetating areas (re-vegetation: mean composite NDVI >= 0.35 on land mined the "
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
    here = sites_path(root, region.id, period.id)
    if not here.exists():
        raise missing_partition(
            context,
            f"no sites at {here}: materialise `asm_sites` for {region.id}/{period.id} first",
        )
    prev = region.previous_period(period.id)
    there = last = None
    if prev is not None:
        there = sites_path(root, region.id, prev.id)
        if not there.exists():
            raise missing_partition(
                context,
                f"asm_change {region.id}/{period.id} compares with the previous "
                f"period, {prev.id}, whose sites are missing ({there}): materialise "
                f"`asm_sites` for {region.id}/{prev.id} first",
            )
        last = change_path(root, region.id, prev.id)
    comp = composite_path(root, region.id, period.id)
    table = change_table(
        region, period.id, here, there, change_path(root, region.id, period.id),
        previous_change=last if last is not None and last.exists() else None,
        composite=comp if comp.exists() else None,
        progress=lambda m: context.log.info(f"asm_change {region.id} {m}"),
    )  # fmt: skip
    first_period = region.periods[0]
    first = None
    if first_period.id == period.id:
        first = (period.id, table.summary["mining_ha"])
    elif (p := sites_path(root, region.id, first_period.id)).exists():
        first = (first_period.id, mining_ha(p))
    prev_ha = mining_ha(there) if there is not None else None
    summary = summarise(table.summary, prev_ha, first)
    target = table.path
    write_summary(summary, root, region.id, period.id)
    views = refresh_views(root)
    s = summary
    context.log.info(
        f"asm_change {region.id} {period.id}: mining {s['mining_ha']:.1f} ha, "
        + ", ".join(f"{k} {s[f'{k}_ha']:.1f}" for k in KINDS)
        + f"; growth vs previous {s['growth_vs_previous']}, vs first {s['growth_vs_first']}"
    )
    for note in table.notes:
        context.log.info(f"asm_change {region.id} {period.id}: {note}")

    def num(v: float | None) -> dg.MetadataValue:
        return dg.MetadataValue.float(float(v)) if v is not None else dg.MetadataValue.null()

    tables = [("asm_change", target, None), ("region_summary", summary_path(root, region.id, period.id), None)]  # fmt: skip
    return dg.MaterializeResult(
        check_results=table_checks(tables, region, context.log, f"{region.id} {period.id}"),
        metadata={
            "path": dg.MetadataValue.path(str(target)),
            **row_count(target),
            "mining_ha": num(s["mining_ha"]),
            **{f"{k}_ha": num(s[f"{k}_ha"]) for k in KINDS},
            "growth_vs_previous": num(s["growth_vs_previous"]),
            "growth_vs_first": num(s["growth_vs_first"]),
            "previous_period": dg.MetadataValue.text(s["previous_period"] or "none"),
            "notes": dg.MetadataValue.text(s["notes"] or "none"),
            "catalog": dg.MetadataValue.json(views),
        },
    )
