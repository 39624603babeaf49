"""The report asset: a region's expansion map, HTML report and offline web map.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

import dagster as dg

from assets.change import asm_change
from assets.partitions import REGIONS, partition_key, region_of
from assets.resources import AsmwatchSettings, fail_fast
from assets.risk import BY_REGION, alerts, concession_risk, protected_area_pressure
from pipelines.stages.reports import REPORT_FILES, ReportError, make_reports, markdown_image

REPORT_CHECK = "report_complete"

#: The tables the report reads (per region and period), and what each is computed from.
#: A table materialised before its inputs were last materialised is stale: its own last
#: run failed or was not run, and a report would mix its old rows with newer ones.
READS_FROM: dict[str, tuple[str, ...]] = {
    "asm_change": ("asm_sites",),
    "concession_risk": ("asm_sites", "asm_change", "context_layers"),
    "protected_area_pressure": ("asm_sites", "asm_change", "context_layers"),
    "alerts": ("asm_sites", "asm_change", "context_layers"),
}


def _materialised_at(instance: dg.DagsterInstance, asset: str, partition: str) -> float | None:
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=1,
    )
    return result.records[0].timestamp if result.records else None


def stale_inputs(instance: dg.DagsterInstance, region_id: str, period_ids: list[str]) -> list[str]:
    """Each table the report would read that is older than one of its own inputs."""
    import datetime as dt

    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    problems = []
    for period in period_ids:
        pk = partition_key(region_id, period)
        for table, inputs in READS_FROM.items():
            made = _materialised_at(instance, table, pk)
            if made is None:
                continue  # never materialised: the report itself names what is missing
            for up in inputs:
                up_made = _materialised_at(instance, up, region_id if up == "context_layers" else pk)  # fmt: skip
                if up_made is not None and up_made > made:
                    problems.append(
                        f"{table} {pk} (materialised {when(made)}) is older than its input "
                        f"{up} (materialised {when(up_made)})"
                    )
                    break
    return problems


@dg.asset(
    partitions_def=REGIONS,
    group_name="reports",
    kinds={"html", "png"},
    owners=["team:asmwatch"],
    deps=[
        dg.AssetDep(a, partition_mapping=BY_REGION)
        for a in (asm_change, concession_risk, protected_area_pressure, alerts)
    ],
    check_specs=[
        dg.AssetCheckSpec(
            REPORT_CHECK,
            asset="region_report",
            description=(
                "The map, the report and the web map were written, and they cover every "
                "period of the region (a warning names the periods not yet materialised)."
            ),
        )
    ],
    description=(
        "Reports for people outside the team, per region, over all its periods: "
        "`reports/<region>/expansion.png` (ASM coloured by the period first seen, over the "
        "latest true-colour composite), report.html (area and growth per period, the "
        "concessions most at risk with their score components, pressure on protected and "
        "indigenous areas, latest alerts) and webmap.html (an offline Leaflet map with a "
        "period selector: ASM, re-vegetation, alerts, composites and context layers, with "
        "a legend and the image dates), all in the region's language (`language`, else its "
        "`country`'s: English, Spanish, French or Portuguese)."
    ),
)
@fail_fast
def region_report(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings
) -> dg.MaterializeResult:
    region = region_of(context, settings.regions())
    stale = stale_inputs(context.instance, region.id, [p.id for p in region.periods])
    if stale:
        tables = sorted({s.split(" ", 2)[0] + " " + s.split(" ", 2)[1] for s in stale})
        raise dg.Failure(
            allow_retries=False,
            description=(
                f"region_report {region.id}: refusing to publish a report that mixes old "
                "and new results. " + "; ".join(stale) + ". Their last runs failed or "
                "were not run: re-materialise " + ", ".join(tables) + ", then the report."
            ),
        )
    try:
        out = make_reports(settings.root(), region, say=context.log.info)
    except ReportError as e:
        raise dg.Failure(description=str(e), allow_retries=False) from e
    data = out.data
    last = data.summary[-1]
    missing = [p.id for p in region.periods if p.id not in data.periods]
    written = {f: (out.directory / f).stat().st_size for f in REPORT_FILES}
    top = data.risk.get(data.latest) or []

    def growth(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table = "| period | ASM ha | new + expanded ha | x previous | alerts |\n|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {s['period']} | {s['mining_ha']:.1f} | {s['new_ha'] + s['expanded_ha']:.1f} | "
        f"{growth(s['growth_vs_previous'])} | {data.alert_total(s['period'])} |"
        for s in data.summary
    )
    return dg.MaterializeResult(
        metadata={
            "preview": dg.MetadataValue.md(
                markdown_image(out.thumbnail, f"ASM expansion, {region.name}")
            ),
            "summary": dg.MetadataValue.md(table),
            "report": dg.MetadataValue.path(str(out.report_html)),
            "web_map": dg.MetadataValue.path(str(out.webmap_html)),
            "expansion_map": dg.MetadataValue.path(str(out.expansion_png)),
            "periods": data.periods,
            "mining_ha": float(last["mining_ha"]),
            "growth_vs_first": float(last["growth_vs_first"] or 1.0),
            "top_concession": str(
                f"{top[0]['name'] or top[0]['concession_id']}: {top[0]['score']:.1f} ({top[0]['band']})"
                if top
                else "none"
            ),
            "alerts_latest": data.alert_total(data.latest),
            "language": f"{out.language}: {region.language_reason}",
            "bytes": written,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=REPORT_CHECK,
                passed=all(written.values()) and not missing,
                severity=dg.AssetCheckSeverity.WARN,
                description=(
                    f"3 files written, periods {', '.join(data.periods)}"
                    + (f"; not yet materialised: {', '.join(missing)}" if missing else "")
                ),
            )
        ],
    )
