"""Asset checks from the data contracts of pipelines/infra/checks.py.

Each table asset declares ``check_specs=specs(...)`` and returns
``check_results=results(...)`` computed on the files it has just written, so every
partition's materialisation carries its checks. Error-severity checks are blocking: a
table that breaks its contract stops the assets built on it in the same run.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.infra.checks import CHECKS, CONTRACTS, Outcome, check_table
from pipelines.regions import Region

DESCRIPTIONS = {
    "schema": "Every contract column is present with its type (docs/data-dictionary.md).",
    "non_empty": "The partition has rows (a warning only where a table may rightly be empty).",
    "geometry_valid": "Geometries present, valid, of the allowed types, inside the region.",
    "areas_plausible": (
        "area_ha finite, non-negative, matching the geometry's UTM area and within the "
        "AOI; scores in 0-100 and equal to the sum of their components; ids unique."
    ),
}


def column_schema(contract: str) -> dict[str, Any]:
    """Definition metadata: the contract's columns and types as Dagster's column schema
    (the UI's Columns tab), the same columns as docs/data-dictionary.md."""
    columns = [dg.TableColumn(name, kind) for name, kind in CONTRACTS[contract].columns.items()]
    return {"dagster/column_schema": dg.TableSchema(columns=columns)}


def row_count(*paths: Path | None) -> dict[str, Any]:
    """Runtime metadata: the rows of the files written (``dagster/row_count``), from
    their Parquet footers; a file not written counts none."""
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(p).num_rows for p in paths if p is not None and p.exists())
    return {"dagster/row_count": int(rows)}


def specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(name, asset=asset, blocking=True, description=DESCRIPTIONS[name])
        for name in CHECKS
    ]


def run_checks(tables: Sequence[tuple[str, Path, str | None]], region: Region) -> list[Outcome]:
    """Check each (contract, file, view) and merge the outcomes by check name.

    A merged check passes when it passes on every table; a failure is an error when any
    failing table's check is an error.
    """
    by_name: dict[str, list[tuple[str, Outcome]]] = {}
    for contract, path, view in tables:
        for o in check_table(path, CONTRACTS[contract], region, view=view):
            by_name.setdefault(o.name, []).append((view or contract, o))
    merged = []
    for name in CHECKS:
        parts = by_name.get(name, [])
        if not parts:
            continue
        failing = [o for _, o in parts if not o.passed]
        label = (lambda t: f"{t}: ") if len(parts) > 1 else (lambda t: "")
        merged.append(
            Outcome(
                name,
                not failing,
                "; ".join(label(t) + o.description for t, o in parts),
                "ERROR" if any(o.severity == "ERROR" for o in failing) else parts[0][1].severity,
                {t: o.metadata for t, o in parts},
            )
        )
    return merged


def results(
    outcomes: list[Outcome], where: str, log: dg.DagsterLogManager | None = None
) -> list[dg.AssetCheckResult]:
    """Dagster check results; each message starts with ``where`` (the region and the
    period checked), which the check's own history in the UI does not otherwise show."""
    out = []
    for o in outcomes:
        description = f"{where}: {o.description}"
        if log is not None and not o.passed:
            (log.error if o.severity == "ERROR" else log.warning)(f"check {o.name}: {description}")
        out.append(
            dg.AssetCheckResult(
                check_name=o.name,
                passed=o.passed,
                severity=dg.AssetCheckSeverity.ERROR if o.severity == "ERROR" else dg.AssetCheckSeverity.WARN,
                description=description[:2000],
                metadata={"details": o.metadata},
            )
        )  # fmt: skip
    return out


def nothing_written(why: str) -> list[Outcome]:
    """Outcomes for a partition that wrote no file (no scenes in the period)."""
    return [Outcome(name, name != "non_empty", why, "WARN", {}) for name in CHECKS]


def table_checks(
    tables: Sequence[tuple[str, Path, str | None]],
    region: Region,
    log: dg.DagsterLogManager,
    where: str | None = None,
) -> list[dg.AssetCheckResult]:
    """``results(run_checks(...))``, logging failures; messages name ``where`` (default:
    the region)."""
    return results(run_checks(tables, region), where or region.id, log)
