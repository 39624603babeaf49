"""The report asset: a region's expansion map, HTML report and offline web map.

No ``from __future__ import annotations`` here: Dagster inspects the context annotation.
"""

import dagster as dg

from assets.change import asm_change
from assets.partitions import REGIONS, region_of
from assets.resources import AsmwatchSettings
from assets.risk import BY_REGION, alerts, concession_risk, protected_area_pressure
from pipelines.reports import REPORT_FILES, ReportError, make_reports, markdown_image

REPORT_CHECK = "report_complete"


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
        "reports/<region>/expansion.png (ASM coloured by the period first seen, over the "
        "latest true-colour composite), report.html (area and growth per period, the "
        "concessions most at risk with their score components, pressure on protected and "
        "indigenous areas, latest alerts) and webmap.html (an offline Leaflet map with a "
        "period selector: ASM, re-vegetation, alerts, composites and context layers)."
    ),
)
def region_report(
    context: dg.AssetExecutionContext, settings: AsmwatchSettings
) -> dg.MaterializeResult:
    region = region_of(context, settings.regions())
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
        f"{growth(s['growth_vs_previous'])} | {len(data.alerts.get(s['period'], []))} |"
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
            "periods": dg.MetadataValue.json(data.periods),
            "mining_ha": dg.MetadataValue.float(float(last["mining_ha"])),
            "growth_vs_first": dg.MetadataValue.float(float(last["growth_vs_first"] or 1.0)),
            "top_concession": dg.MetadataValue.text(
                f"{top[0]['name'] or top[0]['concession_id']}: {top[0]['score']:.1f} ({top[0]['band']})"
                if top
                else "none"
            ),
            "alerts_latest": dg.MetadataValue.int(len(data.alerts.get(data.latest, []))),
            "bytes": dg.MetadataValue.json(written),
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
