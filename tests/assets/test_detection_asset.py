"""`mining_model` and `mining_probability` materialised in-process after the composites."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from assets.composite import composite
from assets.detection import asm_sites, mining_model, mining_probability
from assets.partitions import partition_key
from assets.resources import TorchResource
from assets.scenes import scenes
from tests.assets.test_composite_asset import _meta, _regions_file, _resources


@pytest.mark.slow
def test_model_then_probability(tmp_path: Path) -> None:
    regions = _regions_file(tmp_path)
    res = {
        **_resources(tmp_path, regions),
        "torch_device": TorchResource(device="cpu", tile=128, overlap=16),
    }
    for period in ("2019", "2020"):
        key = partition_key("demo-huepetuhe", period)
        assert dg.materialize([scenes, composite], partition_key=key, resources=res).success

    key = partition_key("demo-huepetuhe", "2020")
    before = dg.materialize([mining_probability], partition_key=key, resources=res)
    assert before.success and _meta(before, "mining_probability")["detector"] == "index-baseline"

    tiny = {"chip": 64, "batch": 4, "steps_per_epoch": 2, "max_epochs": 2, "patience": 2}
    run_config = {"ops": {"mining_model": {"config": tiny}}}
    trained = dg.materialize([mining_model], resources=res, run_config=run_config)
    assert trained.success
    m = _meta(trained, "mining_model")
    assert m["reused"] is False and m["device"] == "cpu" and m["epochs"] == 2
    assert 0 <= m["heldout_iou"] <= 1 and 0 <= m["baseline_heldout_iou"] <= 1  # type: ignore[operator]
    assert [d["role"] for d in m["train_data"]] == ["train", "heldout"]  # type: ignore[union-attr]
    assert Path(str(m["path"])).exists()

    again = dg.materialize([mining_model], resources=res, run_config=run_config)
    assert _meta(again, "mining_model")["reused"] is True
    assert _meta(again, "mining_model")["model_id"] == m["model_id"]

    after = dg.materialize([mining_probability], partition_key=key, resources=res)
    p = _meta(after, "mining_probability")
    assert p["detector"] == m["model_id"] and p["device"] == "cpu"
    assert (
        "truth_iou" in p
        and (tmp_path / "data" / "probability" / "demo-huepetuhe" / "2020.tif").exists()
    )

    sites = dg.materialize([asm_sites], partition_key=key, resources=res)
    s = _meta(sites, "asm_sites")
    assert sites.success and s["mmu_ha"] == 0.5
    assert (tmp_path / "data" / "sites" / "demo-huepetuhe" / "2020.parquet").exists()
    assert isinstance(s["site_count"], int) and isinstance(s["total_area_ha"], float)
