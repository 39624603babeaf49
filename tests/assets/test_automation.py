"""Schedules from the regions file and the new_scenes sensor against the real embedded
STAC API: it requests the partition when the source has scenes the table lacks."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.automation import build_schedules, new_scenes, refresh_periods, schedule_name
from assets.definitions import LocationConfig, build_definitions
from assets.partitions import partition_key, sync_partitions
from assets.resources import AsmwatchSettings, StacResource
from assets.scenes import scenes
from pipelines.regions import RegionsError, load_regions, parse_regions
from tests.conftest import materialize, persistent_instance

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.UTC
defs = build_definitions(LocationConfig(ROOT / "data", ROOT / "regions.yaml"))


def test_a_schedule_per_region_with_its_cadence(tmp_path: Path) -> None:
    config = load_regions(ROOT / "regions.yaml")
    scheduled = {s.name: s for s in defs.schedules or []}
    assert set(scheduled) == {schedule_name(r.id) for r in config.regions if r.refresh.cron}
    demo = scheduled["refresh_demo_huepetuhe"]
    assert demo.cron_schedule == "0 6 * * 1" and demo.job_name == "refresh"
    assert demo.default_status == dg.DefaultScheduleStatus.STOPPED
    for when, period in ((dt.datetime(2020, 3, 2, 6, tzinfo=UTC), "2020"),
                         (dt.datetime(2026, 11, 23, 6, tzinfo=UTC), "2021")):  # fmt: skip
        ctx = dg.build_schedule_context(
            instance=persistent_instance(tmp_path / f"home-{period}"),
            scheduled_execution_time=when,
            repository_def=defs.get_repository_def(),
        )
        (req,) = list(demo.evaluate_tick(ctx).run_requests or [])
        assert req.partition_key == partition_key("demo-huepetuhe", period)
        assert req.tags["asmwatch/trigger"] == "schedule"


def test_refresh_block_is_validated() -> None:
    region = {"id": "r", "aoi": {"bbox": [0, 0, 1, 1]}, "periods": [2020, 2021]}
    ok = parse_regions({"regions": [{**region, "refresh": {"cron": "30 2 * * *", "period": "all", "timezone": "America/Lima"}}]})  # fmt: skip
    r = ok.regions[0]
    assert refresh_periods(r, dt.date(2021, 5, 1)) == ["2020", "2021"]
    (sched,) = build_schedules(ok)
    assert sched.execution_timezone == "America/Lima"
    with pytest.raises(RegionsError) as e:
        parse_regions({"regions": [{**region, "refresh": {"cron": "every monday", "timezone": "Mars/Olympus", "watch_scenes": "yes", "period": "latest", "when": 1}}]})  # fmt: skip
    text = str(e.value)
    for part in ("refresh.cron: 'every monday' is not a five-field cron", "refresh.timezone: unknown time zone 'Mars/Olympus'",
                 "refresh.watch_scenes: 'yes' must be true or false", "refresh.period: 'latest'", "refresh.when: unknown field"):  # fmt: skip
        assert part in text
    assert build_schedules(parse_regions({"regions": [region]})) == []  # no cron, no schedule


def _settings(tmp_path: Path, regions: Path) -> AsmwatchSettings:
    return AsmwatchSettings(data_root=str(tmp_path / "data"), regions_file=str(regions))


def _evaluate(tmp_path: Path, regions: Path, instance: dg.DagsterInstance) -> dg.SensorResult:
    with dg.build_sensor_context(
        instance=instance,
        resources={"settings": _settings(tmp_path, regions), "stac": StacResource()},
    ) as ctx:
        result = new_scenes(ctx)
    assert isinstance(result, dg.SensorResult)
    return result


@pytest.mark.slow
def test_new_scenes_sensor_requests_the_partition_with_new_scenes(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "regions.yaml").read_text())
    demo = next(r for r in doc["regions"] if r["id"] == "demo-huepetuhe")
    unreachable = {"id": "offline", "aoi": {"bbox": [-70.6, -13.1, -70.5, -13.0]},
                   "periods": [2021], "source": "http://127.0.0.1:9/stac"}  # fmt: skip
    regions = tmp_path / "regions.yaml"
    regions.write_text(yaml.safe_dump({"defaults": doc["defaults"], "regions": [demo, unreachable]}))  # fmt: skip
    instance = dg.DagsterInstance.ephemeral()

    first = _evaluate(tmp_path, regions, instance)
    (req,) = first.run_requests or []
    assert req.partition_key == partition_key("demo-huepetuhe", "2021")  # the current period
    assert req.tags["asmwatch/new_scenes"] == "4"  # never ingested: every scene is new
    assert json.loads(first.cursor or "{}")["regions"]["demo-huepetuhe"] == {"period": "2021", "scenes": 4, "new": 4}  # fmt: skip

    settings = _settings(tmp_path, regions)
    done = materialize(
        [scenes], partition_key=partition_key("demo-huepetuhe", "2021"),
        resources={"settings": settings, "stac": StacResource()},
    )  # fmt: skip
    assert done.success
    second = _evaluate(tmp_path, regions, instance)
    assert not second.run_requests
    skipped = second.skip_reason.skip_message if second.skip_reason else ""
    assert "demo-huepetuhe 2021: 4 scene(s), none new" in (skipped or "")
    assert "offline: search failed" in (skipped or "")  # and the sensor lives on

    # A new acquisition lands on the source: the same partition is requested again.
    items = tmp_path / "data" / "embedded" / "demo-huepetuhe" / "items"
    src = items / "S2A_19LCF_20210620_0_L2A.json"
    item = json.loads(src.read_text())
    item["id"] = "S2A_19LCF_20210705_0_L2A"
    item["properties"]["datetime"] = "2021-07-05T14:56:21.024Z"
    (items / f"{item['id']}.json").write_text(json.dumps(item))
    third = _evaluate(tmp_path, regions, instance)
    (again,) = third.run_requests or []
    assert again.partition_key == req.partition_key and again.tags["asmwatch/new_scenes"] == "1"
    assert again.run_key != req.run_key
    shutil.rmtree(tmp_path / "data" / "embedded" / ".serve", ignore_errors=True)


@pytest.mark.slow
def test_the_refresh_job_runs_a_partition_end_to_end(
    demo_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What schedules, sensors and backfills launch: `refresh` for one partition, scenes
    to alerts in one run, on a copy of the demo's data root (model and context there)."""
    root = tmp_path / "data"
    shutil.copytree(demo_run[0], root, ignore=shutil.ignore_patterns("dagster_home", "reports"))
    before = (root / "sites" / "demo-huepetuhe" / "2021.parquet").read_bytes()
    monkeypatch.setenv("ASMWATCH_DATA", str(root))
    monkeypatch.setenv("ASMWATCH_REGIONS", str(ROOT / "regions.yaml"))
    instance = dg.DagsterInstance.ephemeral()
    sync_partitions(instance, load_regions(ROOT / "regions.yaml"))
    result = (
        build_definitions(LocationConfig(root, ROOT / "regions.yaml"))
        .resolve_job_def("refresh")
        .execute_in_process(
            partition_key=partition_key("demo-huepetuhe", "2021"),
            instance=instance,
            tags={"asmwatch/trigger": "test"},
        )
    )
    assert result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}  # type: ignore[union-attr]
    assert done == {
        "scenes", "composite", "mining_probability", "asm_sites", "asm_change",
        "concession_risk", "protected_area_pressure", "hotspots", "alerts",
    }  # fmt: skip
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1 + 4 * 7 and all(c.passed for c in checks)
    # Re-running a partition gives the same sites, byte for byte.
    assert (root / "sites" / "demo-huepetuhe" / "2021.parquet").read_bytes() == before


def test_a_sensor_tick_keeps_to_its_budget_and_names_what_it_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sources that accept a connection and never answer, and one that refuses: the
    tick returns within its budget, names every region and why, and the next tick starts
    with the region this one did not reach."""
    import socket
    import time

    import assets.automation as automation

    monkeypatch.setattr(automation, "TICK_BUDGET_S", 3.0)
    monkeypatch.setattr(automation, "MIN_SEARCH_S", 0.5)
    monkeypatch.setattr(automation, "SEARCH_TIMEOUT_S", 1.0)
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)  # connections complete in the backlog; nothing ever answers
    slow = f"http://127.0.0.1:{hang.getsockname()[1]}/stac"

    def region(rid: str, source: str) -> dict[str, object]:
        return {"id": rid, "aoi": {"bbox": [-70.6, -13.1, -70.5, -13.0]}, "periods": [2021],
                "source": source, "refresh": {"watch_scenes": True}}  # fmt: skip

    regions = tmp_path / "regions.yaml"
    doc = {"regions": [region("slow-a", slow), region("slow-b", slow), region("gone", "http://127.0.0.1:9/stac")]}  # fmt: skip
    regions.write_text(yaml.safe_dump(doc))
    instance = dg.DagsterInstance.ephemeral()
    try:
        t = time.monotonic()
        first = _evaluate(tmp_path, regions, instance)
        took = time.monotonic() - t
        assert took < 3.0 + 1.5, f"the tick took {took:.1f} s"
        said = first.skip_reason.skip_message if first.skip_reason else ""
        assert not first.run_requests and all(r in (said or "") for r in ("slow-a", "slow-b", "gone"))  # fmt: skip
        assert "slow-a: search failed" in (said or "")
        assert "gone: not checked" in (said or ""), said
        # slow-b was left behind at the deadline or never started, by how the time fell
        first_next = json.loads(first.cursor or "{}")["next"]
        assert first_next in ("slow-b", "gone")
        with dg.build_sensor_context(
            instance=instance, cursor=first.cursor,
            resources={"settings": _settings(tmp_path, regions), "stac": StacResource()},
        ) as ctx:  # fmt: skip
            second = automation.new_scenes(ctx)
        assert isinstance(second, dg.SensorResult)
        said = second.skip_reason.skip_message if second.skip_reason else ""
        assert (said or "").startswith(f"{first_next}: "), "taken first on the next tick"
    finally:
        hang.close()


OPEN = {"id": "open", "aoi": {"bbox": [-70.6, -13.1, -70.5, -13.0]},
        "periods": {"from": 2019, "every": "year"}, "refresh": {"cron": "0 6 * * 1"}}  # fmt: skip


def test_open_ended_periods_roll_forward_in_the_schedule(tmp_path: Path) -> None:
    """`periods: {from: 2019, every: year}`: a dry run of the schedule on a day of 2027
    requests 2027 (and adds its partition), without editing the file."""
    regions = tmp_path / "regions.yaml"
    regions.write_text(yaml.safe_dump({"regions": [OPEN]}))
    config = load_regions(regions)
    region = config.get("open")
    today = dt.datetime.now(UTC).date()
    assert [p.id for p in region.periods] == [str(y) for y in range(2019, today.year + 1)]
    assert config.partition_keys(dt.date(2021, 6, 1)) == ["open|2019", "open|2020", "open|2021"]
    assert region.current_period(dt.date(2027, 1, 4)).id == "2027"
    assert region.previous_period("2020").id == "2019"  # type: ignore[union-attr]
    with pytest.raises(KeyError, match="period '2031' has not begun"):
        region.period("2031")
    with pytest.raises(KeyError, match="no period '2018'"):
        region.period("2018")

    built = build_definitions(LocationConfig(tmp_path / "data", regions))
    (schedule,) = built.schedules or []
    instance = persistent_instance(tmp_path / "home")
    sync_partitions(instance, config)
    assert not instance.has_dynamic_partition("region_period", "open|2027")
    for when, period in ((dt.datetime(2027, 1, 4, 6, tzinfo=UTC), "2027"),
                         (dt.datetime(2028, 3, 6, 6, tzinfo=UTC), "2028")):  # fmt: skip
        ctx = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=when,
            repository_def=built.get_repository_def(),
        )  # fmt: skip
        (req,) = list(schedule.evaluate_tick(ctx).run_requests or [])  # type: ignore[attr-defined]
        assert req.partition_key == f"open|{period}"
        assert instance.has_dynamic_partition("region_period", f"open|{period}")

    quarters = parse_regions({"regions": [{**OPEN, "periods": {"from": "2024Q3", "every": "quarter", "to": "2025Q2"}}]})  # fmt: skip
    q = quarters.get("open")
    assert [p.id for p in q.periods_until(dt.date(2030, 1, 1))] == ["2024Q3", "2024Q4", "2025Q1", "2025Q2"]  # fmt: skip
    assert q.period("2025Q1").start == dt.date(2025, 1, 1) and q.period("2024Q4").end == dt.date(2024, 12, 31)  # fmt: skip


@pytest.mark.parametrize(
    "periods, message",
    [
        ({"from": 2019, "every": "month"}, "periods.every: 'month': use one of year, quarter"),
        ({"from": "2019Q1", "every": "year"}, "periods.from: '2019Q1' is not a year"),
        ({"every": "year"}, "periods.from: missing"),
        ({"from": 2021, "to": 2019, "every": "year"}, "periods: to 2019 is before from 2021"),
        ({"from": 2019, "every": "year", "until": 2020}, "periods.until: unknown field"),
        ({"from": 2010, "every": "year"}, "periods.from: year 2010 is outside Sentinel-2's era"),
    ],
)
def test_bad_open_ended_periods_are_named(periods: object, message: str) -> None:
    with pytest.raises(RegionsError) as e:
        parse_regions({"regions": [{**OPEN, "periods": periods}]})
    assert f"regions[0] (open).{message}" in str(e.value)


def test_partitions_follow_the_file_and_a_removed_region_is_reported(tmp_path: Path) -> None:
    """The region_partitions sensor adds what the file defines; a region removed from it
    keeps its partitions and files but is warned about, refused by the assets, and left
    out of the catalog."""

    doc = yaml.safe_load((ROOT / "regions.yaml").read_text())
    demo = next(r for r in doc["regions"] if r["id"] == "demo-huepetuhe")
    regions = tmp_path / "regions.yaml"
    regions.write_text(yaml.safe_dump({"regions": [demo, OPEN]}))
    _removed_region(tmp_path, regions, demo, persistent_instance(tmp_path / "home"))


def _removed_region(tmp_path: Path, regions: Path, demo: dict[str, object], instance: dg.DagsterInstance) -> None:  # fmt: skip
    from assets.automation import region_partitions
    from pipelines.infra.integrity import removed_region_files
    from pipelines.stages.catalog import refresh_views

    cursor: list[str | None] = [None]

    def tick() -> tuple[str, list[str]]:
        with dg.build_sensor_context(
            instance=instance,
            cursor=cursor[0],
            resources={"settings": _settings(tmp_path, regions)},
        ) as ctx:
            result = region_partitions(ctx)
            cursor[0] = ctx.cursor  # the partitions not in the file, warned about once
        assert isinstance(result, dg.SkipReason)
        return result.skip_message or "", instance.get_dynamic_partitions("region_period")

    said, keys = tick()
    year = dt.datetime.now(UTC).year
    assert keys[:3] == ["demo-huepetuhe|2019", "demo-huepetuhe|2020", "demo-huepetuhe|2021"]
    assert keys[3:] == [f"open|{y}" for y in range(2019, year + 1)]
    assert f"added {3 + year - 2018 + 2}, 0 not in the file" in said  # and the 2 regions

    regions.write_text(yaml.safe_dump({"regions": [demo]}))  # "open" is removed
    said, keys = tick()
    assert f"added 0, {year - 2018 + 1} not in the file" in said  # its periods and itself
    assert "open|2019" in keys  # kept: its history stays readable
    assert json.loads(cursor[0] or "[]")[:2] == ["open", "open|2019"]

    # its files stay on disk, but the catalog no longer serves them, and doctor names them
    settings = _settings(tmp_path, regions)
    root = settings.root()
    for region_id in ("open", "demo-huepetuhe"):
        (root / "sites" / region_id).mkdir(parents=True)
    warned: list[str] = []
    refresh_views(root, say=warned.append, regions=settings.regions().ids)
    assert removed_region_files(root, settings.regions().ids) == {} and not warned
    import geopandas as gpd
    import shapely

    frame = gpd.GeoDataFrame({"site_id": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=4326)
    frame.to_parquet(root / "sites" / "open" / "2021.parquet")
    warned.clear()
    status = refresh_views(root, say=warned.append, regions=settings.regions().ids)
    assert status["regions_left_out"] == ["open"]
    assert any("region 'open' is not in the regions file" in w for w in warned)
    assert removed_region_files(root, settings.regions().ids) == {
        "open": ["sites/open/2021.parquet"]
    }

    # and its assets refuse to run, naming the regions file
    failed = materialize(
        [scenes], partition_key="open|2021", instance=instance,
        resources={"settings": settings, "stac": StacResource()}, raise_on_error=False,
    )  # fmt: skip
    assert not failed.success
    error = failed.get_step_failure_events()[0].event_specific_data.error  # type: ignore[union-attr]
    assert "partition open|2021: no region 'open' in" in str(error) and "regions.yaml" in str(error)


def test_steps_retry_transient_faults_only(tmp_path: Path) -> None:
    """An asset body behind fail_fast with a retry policy: a refused connection is tried
    again (3 tries), a bad input fails once, naming the error, never retried."""
    from assets.resources import fail_fast

    tries: list[str] = []
    policy = dg.RetryPolicy(max_retries=2, delay=0)

    @dg.asset(retry_policy=policy)
    @fail_fast
    def flaky(context):  # type: ignore[no-untyped-def]  # (annotations are strings here)
        tries.append("flaky")
        raise ConnectionRefusedError(111, "Connection refused")

    @dg.asset(retry_policy=policy)
    @fail_fast
    def broken(context):  # type: ignore[no-untyped-def]
        tries.append("broken")
        raise ValueError("regions.yaml: bbox west 200 is not a longitude")

    for asset, n in ((flaky, 3), (broken, 1)):
        result = dg.materialize([asset], raise_on_error=False)
        assert not result.success and tries.count(asset.key.path[0]) == n
    error = str(result.get_step_failure_events()[0].event_specific_data.error)  # type: ignore[union-attr]
    assert "broken: ValueError: regions.yaml: bbox west 200 is not a longitude" in error
    assert "not retried" in error
