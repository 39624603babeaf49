"""Partitions: region x period, from the regions file.

Reading the regions file is a local YAML read, cheap enough for definition load (no STAC
call happens here). The period dimension is the union of every region's periods; a
region asked for a period it does not list fails with a message naming its periods.
"""

from __future__ import annotations

import os

import dagster as dg

from pipelines.regions import Period, Region, RegionsConfig, load_regions


def region_period_partitions(config: RegionsConfig | None = None) -> dg.MultiPartitionsDefinition:
    config = config or load_regions()
    return dg.MultiPartitionsDefinition(
        {
            "period": dg.StaticPartitionsDefinition(config.all_period_ids()),
            "region": dg.StaticPartitionsDefinition(config.ids),
        }
    )


def partition_key(region_id: str, period_id: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"region": region_id, "period": period_id})


def region_and_period(
    context: dg.AssetExecutionContext, config: RegionsConfig
) -> tuple[Region, Period]:
    keys = context.partition_key.keys_by_dimension
    try:
        region = config.get(keys["region"])
        return region, region.period(keys["period"])
    except KeyError as e:
        raise dg.Failure(allow_retries=False, description=str(e.args[0])) from e


PARTITIONS = region_period_partitions()

#: Region-only assets (context layers): one partition per region of the regions file.
REGIONS = dg.StaticPartitionsDefinition(load_regions().ids)


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


def region_of(context: dg.AssetExecutionContext, config: RegionsConfig) -> Region:
    try:
        return config.get(context.partition_key)
    except KeyError as e:
        raise dg.Failure(allow_retries=False, description=str(e.args[0])) from e
