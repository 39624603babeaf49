"""``asmwatch run``: materialise any selection of assets for a region's periods, in order.

The asset graph has three kinds of partition: ``region|period`` (scenes to alerts),
``region`` (context layers, the report) and none (the model, trained on every region's
training periods). A run plan takes the selected assets in the graph's order and groups
them into steps, each one Dagster run of a named job on one partition:

1. ``ingest`` (scenes, composite) for each period, in time order;
2. ``load_context`` (context_layers) for the region;
3. ``train_model`` (mining_model), once;
4. ``detect`` (mining_probability to alerts) for each period in time order: change
   compares each period with the one before;
5. ``report`` (region_report) for the region.

A region whose sites come from a detections file has no use for imagery or the model:
scenes, composite, mining_model and mining_probability are left out of its plan, said so
in one line, so such a region runs offline. Each step prints one line of what it made;
the first failure stops the plan and names the step, the partition and the error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from pipelines.regions import Period, Region, partition_key

#: Every asset, in the order a plan runs them.
ORDER = (
    "scenes", "composite", "context_layers", "mining_model", "mining_probability", "asm_sites",
    "asm_change", "concession_risk", "protected_area_pressure", "hotspots", "alerts",
    "region_report",
)  # fmt: skip
#: (job, its assets, partition scope) in plan order; scope: period | region | none.
GROUPS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("ingest", ("scenes", "composite"), "period"),
    ("load_context", ("context_layers",), "region"),
    ("train_model", ("mining_model",), "none"),
    ("detect", ORDER[4:11], "period"),
    ("report", ("region_report",), "region"),
)
#: What a region with imported detections does not run (no imagery, no model).
IMAGERY_ASSETS = frozenset({"scenes", "composite", "mining_model", "mining_probability"})


class PlanError(ValueError):
    """A selection or period that cannot be planned; the message says why."""


@dataclass(frozen=True)
class Step:
    job: str
    assets: tuple[str, ...]
    partition: str | None  # region|period, region, or None (the model)
    label: str  # what the progress line starts with: a period, or the asset


@dataclass
class Plan:
    region: Region
    periods: list[Period]
    steps: list[Step]
    notes: list[str] = field(default_factory=list)


def selected_assets(
    defs: dg.Definitions, select: Sequence[str] | None = None, start: str | None = None
) -> list[str]:
    """The asset names ``--select`` (a list) or ``--from`` (an asset and everything
    downstream of it) names, in plan order; every asset when neither is given."""
    if select and start:
        raise PlanError("give --select or --from, not both")
    names = list(select or ([start] if start else []))
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise PlanError(f"unknown asset(s) {', '.join(unknown)} (known: {', '.join(ORDER)})")
    if not names:
        return list(ORDER)
    if start:
        graph = defs.resolve_asset_graph()
        keys = dg.AssetSelection.assets(start).downstream().resolve(graph)
        names = [k.to_user_string() for k in keys]
    return [a for a in ORDER if a in names]


def plan(
    defs: dg.Definitions,
    region: Region,
    period_ids: Sequence[str] | None = None,
    select: Sequence[str] | None = None,
    start: str | None = None,
) -> Plan:
    """The steps that materialise the selection for ``period_ids`` (default: every
    period of the region), periods in time order."""
    try:
        periods = [region.period(p) for p in period_ids] if period_ids else list(region.periods)
    except KeyError as e:
        raise PlanError(str(e.args[0])) from None
    periods.sort(key=lambda p: p.start)  # change compares each period with the one before
    assets = selected_assets(defs, select, start)
    notes = []
    if region.detections is not None:
        left = [a for a in assets if a in IMAGERY_ASSETS]
        if left:
            notes.append(
                f"{region.id} imports its detections ({region.detections.path}): "
                f"{', '.join(left)} left out (no imagery or model needed)"
            )
        assets = [a for a in assets if a not in IMAGERY_ASSETS]
    steps = []
    for job, members, scope in GROUPS:
        chosen = tuple(a for a in members if a in assets)
        if not chosen:
            continue
        if scope == "period":
            for p in periods:
                steps.append(Step(job, chosen, partition_key(region.id, p.id), p.id))
        elif scope == "region":
            steps.append(Step(job, chosen, region.id, _LABELS.get(chosen[0], chosen[0])))
        else:
            steps.append(Step(job, chosen, None, chosen[0]))
    if not steps:
        raise PlanError(f"nothing to run for {region.id}: {'; '.join(notes) or 'empty selection'}")
    return Plan(region, periods, steps, notes)


_LABELS = {"context_layers": "context layers", "region_report": "region report"}


@dataclass
class Outcome:
    """What a plan did: each step's metadata by asset, the checks, and any failure."""

    metadata: dict[tuple[str, str | None], dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, int] = field(default_factory=lambda: {"passed": 0, "warning": 0, "failed": 0})  # fmt: skip
    failed: str | None = None  # "<job> <partition>: <error>"

    def meta(self, asset: str, partition: str | None) -> dict[str, Any]:
        return self.metadata.get((asset, partition), {})


def execute(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    the_plan: Plan,
    *,
    tags: dict[str, str] | None = None,
    run_config: dict[str, Any] | None = None,
    job_config: dict[str, dict[str, Any]] | None = None,
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> Outcome:
    """Run the plan's steps in order, one line each; stop at the first failure.

    ``run_config`` goes to every step's run, ``job_config[job]`` too to that job's."""
    out = Outcome()
    for note in the_plan.notes:
        say(f"  note: {note}")
    for step in the_plan.steps:
        if step.job == "train_model":
            say("  training the mining model (U-Net, CPU unless a GPU is present) ...")
        t = time.monotonic()
        job = defs.resolve_job_def(step.job)
        selection = [dg.AssetKey(a) for a in step.assets]
        result = job.execute_in_process(
            instance=instance,
            tags=tags,
            partition_key=step.partition,
            run_config={**(run_config or {}), **(job_config or {}).get(step.job, {})},
            asset_selection=selection,
            raise_on_error=False,
        )
        for ev in result.get_asset_materialization_events():
            mat = ev.step_materialization_data.materialization
            values = {k: v.value for k, v in mat.metadata.items()}
            out.metadata[(mat.asset_key.to_user_string(), step.partition)] = values
        for check in result.get_asset_check_evaluations():
            is_warn = check.severity == dg.AssetCheckSeverity.WARN
            outcome = "passed" if check.passed else "warning" if is_warn else "failed"
            out.checks[outcome] += 1
            if not check.passed:
                name = f"{check.asset_key.to_user_string()}.{check.check_name}"
                warn(f"  check {name} ({step.label}): {outcome}: {check.description}")
        if not result.success:
            errors = [
                (ev.step_key or "", ev.step_failure_data.error.message.strip())
                for ev in result.all_events
                if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error
            ]
            where = f"{step.job} {step.partition or ''}".rstrip()
            warn(f"  {step.label}: FAILED ({where}); see the run {result.run_id} in `asmwatch ui`")  # fmt: skip
            for key, message in errors:
                warn(f"    {key}: {message}")
            first = errors[0] if errors else ("", "the run failed")
            what = " ".join(x for x in (first[0] or step.job, step.partition) if x)
            out.failed = f"{what}: {first[1]}"
            return out
        say(f"  {step.label}: {describe(step, out)}  [{time.monotonic() - t:.1f} s]")
    return out


def describe(step: Step, out: Outcome) -> str:
    """One line of what a step made, from its assets' metadata."""
    parts = []
    for asset in step.assets:
        m = out.meta(asset, step.partition)
        text = _DESCRIBE.get(asset, _rows)(m) if m else f"{asset}: nothing materialised"
        if text:
            parts.append(text)
    return "; ".join(parts)


def _rows(m: dict[str, Any]) -> str:
    return f"{m.get('dagster/row_count', '?')} row(s)"


def _scenes(m: dict[str, Any]) -> str:
    cc = m.get("cloud_cover") or {}
    return (
        f"{m['scene_count']} scenes (of {m['returned']} returned, {m['dropped']} dropped), "
        f"cloud cover median {cc.get('median', '-')}%, tiles {', '.join(m.get('tiles') or []) or '-'}"
    )


def _composite(m: dict[str, Any]) -> str:
    ndvi = (m.get("band_means") or {}).get("NDVI", float("nan"))
    return (
        f"composite {m['valid_fraction']:.1%} clear, mean "
        f"{(m.get('clear_count') or {}).get('mean', '-')} clear obs/pixel, NDVI {ndvi:.2f}"
    )


def _context(m: dict[str, Any]) -> str:
    counts = {k.removesuffix("_count"): v for k, v in m.items() if k.endswith("_count") and "/" not in k}  # fmt: skip
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "no layers"


def _model(m: dict[str, Any]) -> str:
    return (
        f"{m['model_id']} ({'reused' if m['reused'] else 'trained'} on {m['device']}), "
        f"held-out IoU {m['heldout_iou']:.3f} vs index baseline {m['baseline_heldout_iou']:.3f}"
    )


def _probability(m: dict[str, Any]) -> str:
    truth = f" (truth {m['truth_ha']} ha), IoU {m['truth_iou']:.3f}" if "truth_ha" in m else ""
    return f"mining {m['mining_ha']:.1f} ha detected{truth}"


def _sites(m: dict[str, Any]) -> str:
    mmu = (m.get("settings") or {}).get("mmu_ha", 0.5)
    return f"{m['site_count']} sites ({m['total_area_ha']:.1f} ha >= {mmu} ha)"


def _change(m: dict[str, Any]) -> str:
    g = m.get("growth_vs_previous")
    return (
        f"new {m['new_ha'] + m['expanded_ha']:.1f} ha, re-vegetating {m['revegetating_ha']:.1f} ha"
        + (f", growth x{g:.3f}" if g is not None else "")
    )


def _pressure(m: dict[str, Any]) -> str:
    return (
        f"ASM on {m['areas_with_asm']} of {m['areas']} protected/indigenous areas "
        f"({m['asm_area_ha']:.1f} ha inside)"
    )


def _risk(m: dict[str, Any]) -> str:
    return f"top concession score {m['max_score']:.1f}"


def _alerts(m: dict[str, Any]) -> str:
    return f"{m['dagster/row_count']} alert(s)"


def _report(m: dict[str, Any]) -> str:
    return f"periods {', '.join(m.get('periods') or [])}"


_DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {
    "scenes": _scenes,
    "composite": _composite,
    "context_layers": _context,
    "mining_model": _model,
    "mining_probability": _probability,
    "asm_sites": _sites,
    "asm_change": _change,
    "protected_area_pressure": _pressure,
    "concession_risk": _risk,
    "hotspots": lambda m: f"{m.get('dagster/row_count', '?')} hotspot cell(s)",
    "alerts": _alerts,
    "region_report": _report,
}
