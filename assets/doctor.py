"""What the Dagster instance says was written: the files ``asmwatch doctor`` expects.

A partition whose table file was deleted is not simply absent to the catalog: Dagster
still shows it materialised, and ``region_summary`` still counts its sites. Each
materialisation recorded here names the files it wrote (by the assets' path rules), so
``pipelines.infra.integrity.doctor`` can report the ones that are gone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipelines.infra.layout import RISK_TABLES, TEMPLATES
from pipelines.regions import split_partition_key

#: Assets whose materialisations promise files, and the files (templates over the root).
EXPECTED: dict[str, tuple[str, ...]] = {
    "scenes": (TEMPLATES["scenes"],),
    "composite": (TEMPLATES["composite"],),
    "mining_probability": (TEMPLATES["probability"],),
    "asm_sites": (TEMPLATES["sites"],),
    "asm_change": (TEMPLATES["change"], TEMPLATES["summary"]),
    **{
        table: (TEMPLATES["risk"].replace("{table}", table),)
        for table in RISK_TABLES
        if table not in ("alerts", "alert_features")
    },
    "alerts": tuple(TEMPLATES["risk"].replace("{table}", t) for t in ("alerts", "alert_features")),
}


def _metadata(instance: Any, asset: str, partition: str) -> dict[str, Any]:
    """The metadata values of the latest materialisation of ``asset`` at ``partition``."""
    import dagster as dg

    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=1,
    )
    if not result.records:
        return {}
    mat = result.records[0].asset_materialization
    return {k: v.value for k, v in (mat.metadata if mat else {}).items()}


def recorded_files(instance: Any) -> Iterator[tuple[str, str, str]]:
    """(path relative to the data root, asset, partition key) of every file written by
    the latest materialisation of each partition (an empty partition writes none)."""
    import dagster as dg

    for asset, templates in EXPECTED.items():
        for pk in sorted(instance.get_materialized_partitions(dg.AssetKey(asset))):
            if "|" not in pk:
                continue
            region, period = split_partition_key(pk)
            if region[:1].isdigit():  # recorded before 2026-12 as period|region
                region, period = period, region
            if _metadata(instance, asset, pk).get("empty") is True:
                continue  # the run found nothing and wrote nothing, on purpose
            for t in templates:
                yield t.format(region=region, period=period), asset, pk
