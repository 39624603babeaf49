"""Jobs, schedules and sensors: how asmwatch runs itself.

- ``refresh`` (region x period): scenes to alerts for one partition. Its runs retry as a
  whole up to twice when the run itself dies (a lost worker, a killed container: Dagster's
  run retries, enabled in dagster.yaml); failing steps follow their own retry policies.
- ``refresh_<region>`` schedules: one per region with ``refresh.cron`` in the regions
  file, requesting the current period (or every period) of that region.
- ``new_scenes`` sensor: searches each watched region's STAC source for the current
  period and requests a ``refresh`` of the partition when it returns scenes that the
  stored ``scenes`` table does not hold (run key: region, period and the scene set, so
  the same scenes never trigger twice). Each tick ends within ``TICK_BUDGET_S`` whatever
  the sources do: a search gets what is left of the budget (one retry, short timeouts)
  and is abandoned past it; regions are taken in turn from where the last tick stopped,
  and the tick's log and skip reason name every region not checked and why.
- ``reports_after_alerts`` sensor: when ``alerts`` lands for a region, requests the
  ``report`` job for that region, so the published map follows every refresh.
- ``region_partitions`` sensor (running by default): keeps the dynamic partitions equal
  to the regions file (``assets.partitions.sync_partitions``): adds each region and each
  period that has begun, and warns about partitions the file no longer defines.

The other schedules and sensors start stopped: switch them on in the UI (Automation) or with
``dagster schedule start`` / ``dagster sensor start``; the daemon (``make ui`` runs it)
evaluates them. Backfills: select partitions of ``refresh`` in the UI (Launch backfill)
or run ``asmwatch backfill``; asm_change waits for the previous period inside a backfill.

No ``from __future__ import annotations`` here: Dagster inspects the annotations.
"""

import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as SearchTimeout
from typing import Any

import dagster as dg

from assets.change import asm_change
from assets.composite import composite
from assets.detection import asm_sites, mining_probability
from assets.partitions import (
    REGION_PERIODS_NAME,
    partition_key,
    region_of_key,
    sync_partitions,
)
from assets.reports import region_report
from assets.resources import AsmwatchSettings, StacResource
from assets.risk import RISK_ASSETS, alerts
from assets.scenes import scenes
from pipelines.regions import Region, RegionsConfig

#: Run-level retries (needs run_retries enabled in the instance's dagster.yaml): only
#: for runs that die, not for steps that fail (those have their own retry policies).
RUN_RETRY_TAGS = {"dagster/max_retries": "2", "dagster/retry_on_asset_or_op_failure": "false"}

refresh_job = dg.define_asset_job(
    "refresh",
    selection=[scenes, composite, mining_probability, asm_sites, asm_change, *RISK_ASSETS],
    tags=RUN_RETRY_TAGS,
    description="Scenes to alerts for one region and period (what schedules and sensors run).",
)
report_job = dg.define_asset_job(
    "report", selection=[region_report], tags=RUN_RETRY_TAGS,
    description="The expansion map, region report and web map of one region.",
)  # fmt: skip


def schedule_name(region_id: str) -> str:
    return "refresh_" + re.sub(r"[^A-Za-z0-9_]", "_", region_id)


def refresh_periods(region: Region, today: dt.date) -> list[str]:
    """The periods a scheduled refresh of ``region`` requests on ``today`` (open-ended
    periods included up to the one containing ``today``)."""
    if region.refresh.period == "all":
        return [p.id for p in region.periods_until(today)]
    return [region.current_period(today).id]


def _schedule(region: Region) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=schedule_name(region.id),
        cron_schedule=region.refresh.cron,
        execution_timezone=region.refresh.timezone,
        job=refresh_job,
        description=(
            f"Refresh {region.name} ({region.id}): the {region.refresh.period} period(s), "
            f"cron '{region.refresh.cron}' {region.refresh.timezone} (regions file)."
        ),
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )
    def _refresh(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest]:
        when = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
        period_ids = refresh_periods(region, when.date())
        # An open-ended region's new period gets its partition when its time comes
        # (the region_partitions sensor adds it too, within a minute of the day).
        keys = [partition_key(region.id, p) for p in period_ids]
        if context.instance_ref is not None:
            have = set(context.instance.get_dynamic_partitions(REGION_PERIODS_NAME))
            if new := [k for k in keys if k not in have]:
                context.instance.add_dynamic_partitions(REGION_PERIODS_NAME, new)
                context.log.info(f"{schedule_name(region.id)}: added partition(s) {', '.join(new)}")  # fmt: skip
        for period_id in period_ids:
            yield dg.RunRequest(
                run_key=f"{region.id}|{period_id}|{when.isoformat()}",
                partition_key=partition_key(region.id, period_id),
                tags={"asmwatch/trigger": "schedule", "asmwatch/region": region.id},
            )

    return _refresh


def build_schedules(config: RegionsConfig) -> list[dg.ScheduleDefinition]:
    return [_schedule(r) for r in config.regions if r.refresh.cron]


def stored_scene_ids(settings: AsmwatchSettings, region_id: str, period_id: str) -> set[str]:
    import pyarrow.parquet as pq

    from pipelines.infra.layout import scenes_path

    path = scenes_path(settings.root(), region_id, period_id)
    if not path.exists():
        return set()
    return {str(v) for v in pq.read_table(path, columns=["id"]).column("id").to_pylist()}


#: A ``new_scenes`` tick returns within this many seconds, whatever the sources do
#: (Dagster gives a sensor tick 60 s; the daemon evaluates the others meanwhile).
TICK_BUDGET_S = 25.0
#: A search is not started with less than this left in the tick; its region is then
#: checked first on the next tick.
MIN_SEARCH_S = 3.0
#: Each request of a sensor's search: one retry, at most this long per attempt.
SEARCH_TIMEOUT_S = 10.0


def _in_turn(regions: list[Region], first: str | None) -> list[Region]:
    """``regions`` starting from the one with id ``first`` (the last tick's stop)."""
    ids = [r.id for r in regions]
    at = ids.index(first) if first in ids else 0
    return regions[at:] + regions[:at]


@dg.sensor(
    job=refresh_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=(
        "Searches each region with refresh.watch_scenes for scenes of its current period "
        "and requests a refresh of that partition when some are not in its scenes table. "
        f"A tick ends within {TICK_BUDGET_S:.0f} s: regions are searched in turn from where "
        "the last tick stopped, and the tick names those it did not check."
    ),
)
def new_scenes(
    context: dg.SensorEvaluationContext, settings: AsmwatchSettings, stac: StacResource
) -> dg.SensorResult:
    from pipelines.stages.stac.search import RetrySettings, search_scenes

    deadline = time.monotonic() + TICK_BUDGET_S
    config = settings.regions()
    today = dt.datetime.now(dt.UTC).date()
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen = cursor.get("regions", {})
    watched = [r for r in config.regions if r.refresh.watch_scenes]
    order = _in_turn(watched, cursor.get("next"))
    requests = []
    skipped = []
    next_region = None
    # a search runs in a thread so that the tick can leave it behind at the deadline
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="new_scenes")
    try:
        for i, region in enumerate(order):
            period = region.current_period(today)
            left = deadline - time.monotonic()
            if left < MIN_SEARCH_S:
                next_region = region.id
                why = f"not checked: the tick's {TICK_BUDGET_S:.0f} s were spent (first next tick)"
                for r in order[i:]:
                    skipped.append(f"{r.id}: {why}")
                    context.log.warning(f"new_scenes {r.id}: {why}")
                break
            retry = RetrySettings(
                retries=1, backoff_s=0.2, timeout_s=min(SEARCH_TIMEOUT_S, left / 2)
            )

            def search(region: Region = region, period: Any = period, retry: Any = retry) -> Any:
                url = stac.url_for(region, settings.root(), log=context.log)
                return search_scenes(url, region, period, progress=context.log.debug, retry=retry)

            try:
                found = pool.submit(search).result(timeout=left)
            except SearchTimeout:
                why = f"search still running after {left:.0f} s, left behind (first next tick)"
                context.log.warning(f"new_scenes {region.id} {period.id}: {why}")
                skipped.append(f"{region.id}: {why}")
                next_region = region.id
                for r in order[i + 1 :]:
                    skipped.append(f"{r.id}: not checked: the tick's budget was spent")
                break
            except Exception as e:  # one unreachable source must not stop the others
                context.log.warning(f"new_scenes {region.id} {period.id}: search failed: {e}")
                skipped.append(f"{region.id}: search failed")
                continue
            ids = sorted(s.id for s in found.scenes)
            new = sorted(set(ids) - stored_scene_ids(settings, region.id, period.id))
            seen[region.id] = {"period": period.id, "scenes": len(ids), "new": len(new)}
            if not new:
                skipped.append(f"{region.id} {period.id}: {len(ids)} scene(s), none new")
                continue
            digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
            context.log.info(f"new_scenes {region.id} {period.id}: {len(new)} new scene(s): {', '.join(new[:5])}")  # fmt: skip
            requests.append(
                dg.RunRequest(
                    run_key=f"{region.id}|{period.id}|{digest}",
                    partition_key=partition_key(region.id, period.id),
                    tags={
                        "asmwatch/trigger": "new_scenes",
                        "asmwatch/region": region.id,
                        "asmwatch/new_scenes": str(len(new)),
                    },
                )
            )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        stac.stop_all()
    keys = [r.partition_key for r in requests if isinstance(r.partition_key, str)]
    return dg.SensorResult(
        run_requests=requests,
        # an open-ended region's current period may be newer than its partitions
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(REGION_PERIODS_NAME, keys)]
        if keys
        else None,
        skip_reason=None if requests else "; ".join(skipped) or "no region is watched",
        cursor=json.dumps({"regions": seen, "next": next_region}, sort_keys=True),
    )


@dg.asset_sensor(
    asset_key=alerts.key,
    job=report_job,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests the region's report when its alerts are materialised.",
)
def reports_after_alerts(
    context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry
) -> Iterator[dg.RunRequest]:
    mat = asset_event.asset_materialization
    if mat is None or mat.partition is None:
        return
    region_id = region_of_key(mat.partition)
    yield dg.RunRequest(
        run_key=f"{region_id}|{asset_event.timestamp}",
        partition_key=region_id,
        tags={"asmwatch/trigger": "alerts", "asmwatch/region": region_id},
    )


#: How often the region_partitions sensor compares the partitions with the regions file.
PARTITION_SYNC_S = 60


@dg.sensor(
    minimum_interval_seconds=PARTITION_SYNC_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Keeps the partitions equal to the regions file: adds each region, and each "
        "region|period the file defines (open-ended periods when they begin); warns about "
        "partitions the file no longer defines (their files stay; `asmwatch doctor` lists "
        "them). Runs nothing."
    ),
)
def region_partitions(
    context: dg.SensorEvaluationContext, settings: AsmwatchSettings
) -> dg.SkipReason:
    config = settings.regions()
    done = sync_partitions(context.instance, config)
    if done.added:
        context.log.info(f"region_partitions: added {len(done.added)}: {', '.join(done.added)}")
    # the warning is logged when the set of such partitions changes, not every minute
    stale = json.dumps(sorted(done.stale))
    if (message := done.stale_message(config)) is not None and stale != context.cursor:
        context.log.warning(f"region_partitions: {message}")
    context.update_cursor(stale)
    return dg.SkipReason(
        f"{len(config.partition_keys())} region|period partition(s) from {config.path}; "
        f"added {len(done.added)}, {len(done.stale)} not in the file"
    )
