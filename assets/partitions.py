"""Partitions: region x period, from the regions file.

Reading the regions file is a local YAML read, cheap enough for definition load (no STAC
call happens here). The period dimension is the union of every region's periods; a
region asked for a period it does not list fails with a message naming its periods.
"""

from __future__ import annotations

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
        raise dg.Failure(description=str(e.args[0])) from e


PARTITIONS = region_period_partitions()

#: Region-only assets (context layers): one partition per region of the regions file.
REGIONS = dg.StaticPartitionsDefinition(load_regions().ids)


def region_of(context: dg.AssetExecutionContext, config: RegionsConfig) -> Region:
    try:
        return config.get(context.partition_key)
    except KeyError as e:
        raise dg.Failure(description=str(e.args[0])) from e
