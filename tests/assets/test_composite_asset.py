"""The ``composite`` asset in Dagster: materialised in-process on a real dask cluster,
its blocking valid-fraction check, and the dask resource's two modes."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.composite import VALID_FRACTION_CHECK, composite
from assets.partitions import REGION_PERIODS, partition_key
from assets.resources import AsmwatchSettings, DaskResource, StacResource
from assets.scenes import scenes
from tests.conftest import materialize


def _regions_file(tmp_path: Path, min_valid_fraction: float = 0.5, cloud_mask: str = "scl") -> Path:
    doc = {
        "regions": [
            {
                # The demo's id (so the partition exists), over a smaller AOI.
                "id": "demo-huepetuhe",
                "name": "small test region",
                "aoi": {"bbox": [-70.55, -13.00, -70.525, -12.975]},
                "periods": [2019, 2020],
                "source": "embedded",
                "min_valid_fraction": min_valid_fraction,
                "cloud_mask": cloud_mask,
                "embedded": {"seed": 7, "scenes_per_period": 3},
            }
        ]
    }
    path = tmp_path / "regions.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _resources(tmp_path: Path, regions: Path, **dask: object) -> dict[str, object]:
    return {
        "settings": AsmwatchSettings(data_root=str(tmp_path / "data"), regions_file=str(regions)),
        "stac": StacResource(),
        "dask": DaskResource(
            **(
                {"processes": False, "n_workers": 1, "threads_per_worker": 2, "chunk_size": 128}
                | dask
            )  # type: ignore[arg-type]
        ),
    }


def _meta(result: dg.ExecuteInProcessResult, node: str) -> dict[str, object]:
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


@pytest.mark.slow
def test_composite_materialises_and_rematerialises_identically(tmp_path: Path) -> None:
    regions = _regions_file(tmp_path)
    key = partition_key("demo-huepetuhe", "2020")
    result = materialize(
        [scenes, composite], partition_key=key, resources=_resources(tmp_path, regions)
    )
    assert result.success
    meta = _meta(result, "composite")
    path = tmp_path / "data" / "composite" / "demo-huepetuhe" / "2020.tif"
    assert meta["path"] == str(path) and path.exists()
    assert meta["empty"] is False and meta["scene_count"] == _meta(result, "scenes")["scene_count"]
    assert isinstance(meta["valid_fraction"], float) and meta["valid_fraction"] > 0.5
    assert meta["crs"] == "EPSG:32719" and meta["settings"]["resolution_m"] == 10.0
    assert meta["skipped_count"] == 0 and meta["clear_count"]["max"] >= 1  # type: ignore[index]
    (check,) = [
        c for c in result.get_asset_check_evaluations() if c.asset_key.path == ["composite"]
    ]
    assert check.check_name == VALID_FRACTION_CHECK and check.passed and check.blocking
    first = path.read_bytes()

    again = materialize(
        [composite],
        partition_key=key,
        resources=_resources(tmp_path, regions),
    )
    assert again.success and path.read_bytes() == first


@pytest.mark.slow
def test_blocking_check_stops_downstream_assets(tmp_path: Path) -> None:
    regions = _regions_file(tmp_path, min_valid_fraction=0.9999)
    ran: list[str] = []

    @dg.asset(partitions_def=REGION_PERIODS, deps=["composite"])
    def downstream() -> None:
        ran.append("downstream")

    result = materialize(
        [scenes, composite, downstream],
        partition_key=partition_key("demo-huepetuhe", "2019"),
        resources=_resources(tmp_path, regions),
        raise_on_error=False,
    )
    (check,) = [
        c for c in result.get_asset_check_evaluations() if c.asset_key.path == ["composite"]
    ]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "min_valid_fraction 100%" in (check.description or "")
    assert ran == [] and not result.success
    # The composite itself landed (it is the evidence for the failed check).
    assert (tmp_path / "data" / "composite" / "demo-huepetuhe" / "2019.tif").exists()


def test_dask_resource_connects_to_an_existing_cluster(tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:  # fmt: skip
        res = DaskResource(scheduler_address=cluster.scheduler_address)
        client = res.client()
        try:
            assert client.submit(lambda x: x + 1, 41).result() == 42
            assert client.scheduler.address == cluster.scheduler_address
        finally:
            res.close()


def test_dask_resource_names_an_unreachable_scheduler() -> None:
    res = DaskResource(scheduler_address="tcp://127.0.0.1:9", connect_timeout_s=2)
    with pytest.raises(dg.Failure, match=r"cannot reach the scheduler at 'tcp://127.0.0.1:9'"):
        res.client()


@pytest.mark.slow
def test_s2cloudless_region_runs_through_both_assets(tmp_path: Path) -> None:
    regions = _regions_file(tmp_path, cloud_mask="scl+s2cloudless")
    result = materialize(
        [scenes, composite],
        partition_key=partition_key("demo-huepetuhe", "2019"),
        resources=_resources(tmp_path, regions),
    )
    assert result.success
    sc, comp = _meta(result, "scenes"), _meta(result, "composite")
    assert sc["l1c_twins"] == sc["scene_count"] and sc["l1c_unmatched"] == []
    assert comp["cloud_mask"] == "scl+s2cloudless" and comp["l1c_scenes"] == sc["scene_count"]
