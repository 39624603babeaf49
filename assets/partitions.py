"""Partitions: the region|period keys the regions file defines, and nothing else.

Dagster's multi-dimensional partitions are the cross product of their dimensions (a
``MultiPartitionsDefinition`` of 7 regions and 6 period ids has 42 keys, 8 of which no
region has); Dagster has no sparse multi-partitions (dagster-io/dagster#10796), and its
documented answer is one dimension whose keys encode both. So a region's period is one
dynamic partition, ``region|period`` (``demo-huepetuhe|2021``), of ``REGION_PERIODS``,
and a region is one of ``REGIONS``:

- ``sync_partitions`` adds the keys the regions file defines (for open-ended periods,
  those that have begun) to the instance. The ``region_partitions`` sensor (running by
  default) does it every minute, a schedule adds its own period when its time comes,
  and every ``asmwatch`` command that runs jobs does it first.
- Keys the file no longer defines (a region or a period removed) are not deleted, so
  their history stays readable; they are reported: by the sensor's log, by
  ``asmwatch doctor``, and by the asset that refuses to run one.

Nothing here reads the regions file at import: the definitions are the same for any
file, and ``assets.definitions.build_definitions`` wires the file in.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import dagster as dg

from pipelines.regions import (
    Period,
    Region,
    RegionsConfig,
    partition_key,
    split_partition_key,
)

__all__ = [
    "REGIONS",
    "REGION_PERIODS",
    "REGION_PERIODS_NAME",
    "PartitionSync",
    "missing_partition",
    "partition_key",
    "region_and_period",
    "region_of",
    "split_partition_key",
    "sync_partitions",
]

REGION_PERIODS_NAME = "region_period"
#: One partition per region and period the regions file defines: ``region|period``.
REGION_PERIODS = dg.DynamicPartitionsDefinition(name=REGION_PERIODS_NAME)
REGIONS_NAME = "region"
#: Region-only assets (context layers, reports): one partition per region of the file.
REGIONS = dg.DynamicPartitionsDefinition(name=REGIONS_NAME)


@dataclass(frozen=True)
class PartitionSync:
    """What ``sync_partitions`` did and found."""

    added: tuple[str, ...]  # keys added to the instance
    stale: tuple[str, ...]  # keys in the instance that the regions file no longer defines

    def stale_message(self, config: RegionsConfig) -> str | None:
        if not self.stale:
            return None
        return (
            f"{len(self.stale)} partition(s) in the Dagster instance are not in {config.path}: "
            f"{', '.join(self.stale[:20])}{' ...' if len(self.stale) > 20 else ''}. Their "
            "runs and files are kept but no longer refreshed, and their assets refuse to "
            "run; `asmwatch doctor` lists their files (put the region back in the file, or "
            "delete its files and the partitions)"
        )


def _wanted(config: RegionsConfig, today: dt.date | None) -> dict[str, list[str]]:
    """The keys the regions file defines, by dynamic partitions name."""
    return {REGION_PERIODS_NAME: config.partition_keys(today), REGIONS_NAME: config.ids}


def stale_partitions(
    instance: dg.DagsterInstance, config: RegionsConfig, today: dt.date | None = None
) -> list[str]:
    """Partition keys in the instance that the regions file does not define."""
    out: list[str] = []
    for name, keys in _wanted(config, today).items():
        keep = set(keys)
        out += [k for k in instance.get_dynamic_partitions(name) if k not in keep]
    return out


def sync_partitions(
    instance: dg.DagsterInstance, config: RegionsConfig, today: dt.date | None = None
) -> PartitionSync:
    """Add the partitions the regions file defines (periods begun by ``today``); report
    the ones it no longer defines. Idempotent."""
    added: list[str] = []
    for name, keys in _wanted(config, today).items():
        have = set(instance.get_dynamic_partitions(name))
        if new := [k for k in keys if k not in have]:
            instance.add_dynamic_partitions(name, new)
            added += new
    return PartitionSync(tuple(added), tuple(stale_partitions(instance, config, today)))


def region_and_period(
    context: dg.AssetExecutionContext, config: RegionsConfig
) -> tuple[Region, Period]:
    """The region and period of the run's ``region|period`` partition; a Failure that
    names the regions file when it does not define them (a region removed from it)."""
    try:
        region_id, period_id = split_partition_key(context.partition_key)
        region = config.get(region_id)
        return region, region.period(period_id)
    except ValueError as e:
        raise dg.Failure(allow_retries=False, description=str(e)) from e
    except KeyError as e:
        raise dg.Failure(
            allow_retries=False,
            description=f"partition {context.partition_key}: {e.args[0]}",
        ) from e


def region_of(context: dg.AssetExecutionContext, config: RegionsConfig) -> Region:
    try:
        return config.get(context.partition_key)
    except KeyError as e:
        raise dg.Failure(
            allow_retries=False, description=f"partition {context.partition_key}: {e.args[0]}"
        ) from e


def region_of_key(key: str) -> str:
    """The region id of a ``region|period`` key (or of a region key)."""
    return key.partition("|")[0]


#: How often and how long a backfill run waits for another partition it needs
#: (``ASMWATCH_BACKFILL_WAIT_S`` overrides the wait, in seconds).
BACKFILL_WAIT_RETRIES = 6
BACKFILL_WAIT_S = 60.0


def missing_partition(context: dg.AssetExecutionContext, message: str) -> dg.Failure:
    """The error for a partition that needs another partition's output that is not there.

    Inside a backfill the other partition (the previous period) is likely running in a
    parallel run, so the step asks to be retried a minute later, up to six times; in any
    other run it fails at once, naming what to materialise first.
    """
    backfill = context.run.tags.get("dagster/backfill")
    if backfill and context.retry_number < BACKFILL_WAIT_RETRIES:
        wait = float(os.environ.get("ASMWATCH_BACKFILL_WAIT_S", BACKFILL_WAIT_S))
        context.log.info(
            f"{message}; backfill {backfill}: try {context.retry_number + 1} of "
            f"{BACKFILL_WAIT_RETRIES}, waiting {wait:g} s for that partition"
        )
        raise dg.RetryRequested(max_retries=BACKFILL_WAIT_RETRIES, seconds_to_wait=wait)
    return dg.Failure(
        description=message + (f" (waited {BACKFILL_WAIT_RETRIES} times)" if backfill else ""),
        allow_retries=False,
    )
