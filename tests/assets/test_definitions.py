"""The Dagster layer: definitions load, and `scenes` materialises in-process for a demo
partition through the real embedded STAC server into GeoParquet and DuckDB."""

from __future__ import annotations

from pathlib import Path

import pytest

from assets.definitions import LocationConfig, build_definitions
from assets.partitions import REGION_PERIODS, REGIONS, partition_key, sync_partitions
from assets.resources import AsmwatchSettings, StacResource
from assets.scenes import scenes
from pipelines.regions import load_regions
from pipelines.stages.catalog import connect
from tests.conftest import materialize

ROOT = Path(__file__).resolve().parents[2]
defs = build_definitions(LocationConfig(ROOT / "data", ROOT / "regions.yaml"))


def test_definitions_load() -> None:
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"scenes", "composite", "mining_model", "mining_probability", "asm_sites"} <= keys
    checks = {(k.asset_key.to_user_string(), k.name) for k in repo.asset_graph.asset_check_keys}
    assert ("composite", "valid_fraction") in checks
    assert set(defs.resources or {}) >= {"settings", "stac", "dask", "torch_device"}
    jobs = {j.name for j in repo.get_all_jobs()}  # resolving each job checks its name
    assert jobs >= {"ingest", "train_model", "detect", "load_context"}
    assert {"asm_change", "context_layers"} <= keys


def test_only_the_partitions_the_regions_file_defines() -> None:
    """The cross product of 7 regions and 6 period ids had 42 keys, 8 of which no region
    has (2024|demo-huepetuhe); the partitions are now exactly the file's region|period
    pairs, in the file's order."""
    import dagster as dg

    config = load_regions(ROOT / "regions.yaml")
    instance = dg.DagsterInstance.ephemeral()
    assert REGION_PERIODS.get_partition_keys(dynamic_partitions_store=instance) == []
    done = sync_partitions(instance, config)
    keys = REGION_PERIODS.get_partition_keys(dynamic_partitions_store=instance)
    expected = [f"{r.id}|{p.id}" for r in config.regions for p in r.periods]
    assert keys == expected and list(done.added) == [*expected, *config.ids]
    assert keys[:3] == ["demo-huepetuhe|2019", "demo-huepetuhe|2020", "demo-huepetuhe|2021"]
    assert "demo-huepetuhe|2024" not in keys and "madre-de-dios|2024" in keys
    assert len(keys) == sum(len(r.periods) for r in config.regions) < len(config.ids) * len(config.all_period_ids())  # fmt: skip
    assert REGIONS.get_partition_keys(dynamic_partitions_store=instance) == config.ids
    again = sync_partitions(instance, config)
    assert again.added == () and again.stale == ()  # idempotent


def test_nothing_reads_the_environment_or_the_regions_file_at_import(tmp_path: Path) -> None:
    """Importing the assets and the factory reads no file; only the code location's
    entry point reads the environment, and it names a missing regions file."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ASMWATCH_REGIONS": str(tmp_path / "nowhere.yaml"), "ASMWATCH_DATA": str(tmp_path / "d")}  # fmt: skip
    code = "import assets.definitions, assets.automation, assets.partitions, assets.risk, assets.reports; print('ok')"  # fmt: skip
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import assets.location"], env=env, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert bad.returncode != 0 and "nowhere.yaml" in bad.stderr and "file not found" in bad.stderr
    assert not (tmp_path / "d").exists()


def test_the_factory_wires_the_data_root_as_resource_config(tmp_path: Path) -> None:
    built = build_definitions(LocationConfig(tmp_path / "root", ROOT / "regions.yaml"))
    settings = (built.resources or {})["settings"]
    assert isinstance(settings, AsmwatchSettings)
    assert settings.root() == tmp_path / "root"
    assert Path(settings.regions_file) == ROOT / "regions.yaml"


def _resources(tmp_path: Path) -> dict[str, object]:
    return {
        "settings": AsmwatchSettings(
            data_root=str(tmp_path), regions_file=str(ROOT / "regions.yaml")
        ),
        "stac": StacResource(),
    }


@pytest.mark.slow
def test_scenes_materialises_demo_partition(tmp_path: Path) -> None:
    key = partition_key("demo-huepetuhe", "2021")
    result = materialize([scenes], partition_key=key, resources=_resources(tmp_path))
    assert result.success
    meta = {
        k: v.value for k, v in result.asset_materializations_for_node("scenes")[0].metadata.items()
    }
    assert meta["scene_count"] == 4 and meta["returned"] == 5 and meta["dropped"] == 1
    assert meta["dagster/row_count"] == 4, "the file's rows, for the UI"
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 4 and all(c.passed for c in checks)
    assert all((c.description or "").startswith("demo-huepetuhe 2021: ") for c in checks)
    assert meta["tiles"] == ["19LCF"] and meta["server_side_filter"] is True
    path = tmp_path / "scenes" / "demo-huepetuhe" / "2021.parquet"
    assert meta["path"] == str(path) and path.exists()

    con = connect(tmp_path / "asmwatch.duckdb", read_only=True)
    rows = con.execute(
        "SELECT id, region, period, mgrs_tile, processing_baseline, scale['red'], \"offset\"['red'], "
        "assets['scl'], ST_GeometryType(geometry) FROM scenes ORDER BY datetime"
    ).fetchall()
    con.close()
    assert len(rows) == 4
    assert {r[1:4] for r in rows} == {("demo-huepetuhe", "2021", "19LCF")}
    twin = [r for r in rows if r[0].endswith("_1_L2A")]
    assert len(twin) == 1 and twin[0][4] == "05.00" and twin[0][6] == pytest.approx(-0.1)
    # The embedded world's COGs are named relative to the scenes file (the root can move).
    assert all(r[5] == pytest.approx(1e-4) and r[7].startswith("../../embedded/demo-huepetuhe/") for r in rows)  # fmt: skip
    assert {r[8] for r in rows} == {"POLYGON"}

    # Re-materialising gives the same rows and reuses the simulated world.
    world_json = tmp_path / "embedded" / "demo-huepetuhe" / "world.json"
    mtime = world_json.stat().st_mtime_ns
    again = materialize([scenes], partition_key=key, resources=_resources(tmp_path))
    assert again.success and world_json.stat().st_mtime_ns == mtime
    con = connect(tmp_path / "asmwatch.duckdb", read_only=True)
    assert con.execute("SELECT count(*) FROM scenes").fetchone() == (4,)


def test_region_without_that_period_fails_clearly(tmp_path: Path) -> None:
    key = partition_key("demo-huepetuhe", "2024")
    result = materialize(
        [scenes], partition_key=key, resources=_resources(tmp_path), raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.step_failure_data.error.message)  # type: ignore[union-attr]
    assert "region 'demo-huepetuhe' has no period '2024'" in message
    assert not (tmp_path / "scenes").exists()


def test_the_ui_reads_as_documented() -> None:
    """Descriptions render (a path's ``<region>`` in backticks, not an HTML tag), every
    job says what it runs, and every table asset carries its contract's column schema
    (the UI's Columns tab)."""
    import re

    from pipelines.infra.checks import CONTRACTS

    def tags(text: str | None) -> list[str]:
        return re.findall(r"<[a-z_]+>", re.sub(r"`[^`]*`", "", text or ""))

    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    assert {k: tags(s.description) for k, s in specs.items() if tags(s.description)} == {}
    jobs = [j for j in defs.resolve_all_job_defs() if not j.name.startswith("__")]
    assert len(jobs) >= 6 and [j.name for j in jobs if not j.description] == []
    tables = {
        "scenes": "scenes", "asm_sites": "asm_sites", "asm_change": "asm_change",
        "context_layers": "context", "mining_model": "models", "concession_risk": "concession_risk",
        "protected_area_pressure": "protected_area_pressure", "hotspots": "hotspots",
        "alerts": "alerts",
    }  # fmt: skip
    for asset, contract in tables.items():
        schema = specs[asset].metadata["dagster/column_schema"]
        columns = {c.name: c.type for c in schema.columns}
        assert columns == CONTRACTS[contract].columns, asset
