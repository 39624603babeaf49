"""Which model maps a region: never one trained only on simulated scenes for real imagery.

Models are registered in a real registry (checkpoint files and records; a small network
stands in for the U-Net's weights, which the choice never reads) with the domains that
``training_domain`` records, and regions come from a regions file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import nn

from ml import registry
from ml.features import Normalizer
from ml.models import UnetSpec
from pipelines.regions import RegionsError, parse_regions
from pipelines.stages.detection import DetectionError, TrainingScene, choose_model, training_domain

BBOX = "{bbox: [-70.6, -13.0, -70.5, -12.9]}"


def _regions(extra: str = "") -> Any:
    doc = f"""
regions:
  - {{id: demo, aoi: {BBOX}, periods: [2019, 2020], source: embedded, country: PE}}
  - {{id: other-sim, aoi: {BBOX}, periods: [2019, 2020], source: embedded}}
  - {{id: mdd, aoi: {BBOX}, periods: [2019, 2020], country: PE{extra}}}
  - {{id: tambopata, aoi: {BBOX}, periods: [2019, 2020], country: PE}}
  - {{id: kwale, aoi: {BBOX}, periods: [2019, 2020], country: KE}}
"""
    return parse_regions(yaml.safe_load(doc))


def _register(root: Path, trained_on: list[str], config: Any = None, legacy: bool = False) -> registry.ModelRecord:  # fmt: skip
    config = config or _regions()
    regions = [config.get(r) for r in trained_on]
    scenes = [TrainingScene(r.id, p.id, Path("c.tif"), Path("l.tif"), i == 1) for r in regions for i, p in enumerate(r.periods)]  # fmt: skip
    record = registry.register(
        root, nn.Conv2d(1, 1, 1), UnetSpec(), Normalizer((0.0,) * 9, (1.0,) * 9),
        input_hash_="-".join(trained_on), device="cpu", seconds=1.0,
        train_data=[{"region": s.region, "period": s.period} for s in scenes],
        metrics={"heldout": {"iou": 0.9}, "baseline_heldout": {"iou": 0.7}, "threshold": 0.5},
        config={}, domain=None if legacy else training_domain(regions, scenes),
    )  # fmt: skip
    return record


def test_the_domain_of_a_model_is_recorded(tmp_path: Path) -> None:
    sim = _register(tmp_path, ["demo"])
    assert sim.domain == {
        "imagery": "embedded", "regions": ["demo"], "sources": ["embedded"], "countries": ["PE"],
        "biomes": [], "periods": ["demo/2019", "demo/2020"],
        "bands": ["B02", "B03", "B04", "B08", "B11", "B12", "NDVI", "MNDWI", "BSI"],
        "labels": ["raster"],
    }  # fmt: skip
    mixed = _register(tmp_path, ["demo", "mdd"])
    assert mixed.imagery == "mixed" and mixed.domain["sources"] == ["earth-search", "embedded"]
    # On disk and in the table, read back as written.
    meta = json.loads((registry.models_dir(tmp_path) / sim.model_id / "metadata.json").read_text())  # fmt: skip
    assert meta["domain"]["imagery"] == "embedded"
    assert {r.model_id: r.imagery for r in registry.records(tmp_path)} == {sim.model_id: "embedded", mixed.model_id: "mixed"}  # fmt: skip


def test_auto_never_applies_a_simulated_model_to_real_imagery(tmp_path: Path) -> None:
    config = _regions()
    sim = _register(tmp_path, ["demo"])
    # The simulated region trained on: its own model. Another simulated region: a model
    # of the simulator (its domain).
    assert choose_model(tmp_path, config.get("demo")).record == sim
    assert choose_model(tmp_path, config.get("other-sim")).record == sim
    # A real region: refused, saying how to train one and how to choose.
    with pytest.raises(DetectionError) as e:
        choose_model(tmp_path, config.get("mdd"))
    text = str(e.value)
    assert "region 'mdd' is real imagery (earth-search)" in text
    assert "will not apply a model trained on simulated scenes" in text and sim.model_id in text
    assert "`mining_labels`" in text and "`model: none`" in text and "`model: <model id>`" in text
    # A model trained on real imagery of Peru: used for mdd (its own) and for another
    # Peruvian region, not for Kenya.
    real = _register(tmp_path, ["mdd"])
    assert real.imagery == "real"
    own = choose_model(tmp_path, config.get("mdd"))
    assert own.record == real and own.reason.startswith("trained on this region")
    near = choose_model(tmp_path, config.get("tambopata"))
    assert near.record == real and "same country (PE)" in near.reason
    with pytest.raises(DetectionError, match=r"of its country \(KE\)"):
        choose_model(tmp_path, config.get("kwale"))
    # The demo keeps its own simulated model even though a newer real one exists.
    assert choose_model(tmp_path, config.get("demo")).record == sim


def test_explicit_choices_and_models_without_a_recorded_domain(tmp_path: Path) -> None:
    sim = _register(tmp_path, ["demo"])
    config = _regions(f", model: {sim.model_id}")
    chosen = choose_model(tmp_path, config.get("mdd"))  # asked for: used, and said so
    assert chosen.record == sim and "note: it was trained on simulated (embedded) scenes of demo" in chosen.reason  # fmt: skip
    baseline = choose_model(tmp_path, _regions(", model: none").get("mdd"))
    assert baseline.record is None and "spectral index baseline" in baseline.reason
    with pytest.raises(DetectionError, match="asks for `model: unet-nope`, which is not registered"):  # fmt: skip
        choose_model(tmp_path, _regions(", model: unet-nope").get("mdd"))
    # A model registered before domains were recorded: never chosen by auto for a real
    # region, even of its own country.
    old = _register(tmp_path, ["tambopata"], legacy=True)
    assert old.imagery == "unknown" and old.domain["regions"] == ["tambopata"]
    assert choose_model(tmp_path, _regions().get("tambopata")).record == old  # its own region
    with pytest.raises(DetectionError):
        choose_model(tmp_path, _regions().get("mdd"))
    # No model at all: a simulated region gets the baseline, said so.
    empty = tmp_path / "empty"
    none = choose_model(empty, _regions().get("demo"))
    assert none.record is None and "no model is registered" in none.reason


def test_the_model_setting_in_the_regions_file() -> None:
    assert _regions().get("mdd").model == "auto"
    with pytest.raises(RegionsError, match=r"regions\[2\] \(mdd\)\.model: 'my model!' is not a model choice"):  # fmt: skip
        _regions(", model: 'my model!'")


def test_auto_takes_a_real_model_of_the_same_biome_across_a_border(tmp_path: Path) -> None:
    """Madre de Dios' model serves a Bolivian region of the same biome (after its own
    country's models); never a region of another biome, or one without a biome."""
    doc = f"""
regions:
  - {{id: mdd, aoi: {BBOX}, periods: [2019, 2020], country: PE, biome: tropical moist forest}}
  - {{id: pando, aoi: {BBOX}, periods: [2019, 2020], country: BO, biome: tropical moist forest}}
  - {{id: kedougou, aoi: {BBOX}, periods: [2019, 2020], country: SN, biome: tropical grassland and savanna}}
  - {{id: nobiome, aoi: {BBOX}, periods: [2019, 2020], country: BO}}
"""  # fmt: skip
    config = parse_regions(yaml.safe_load(doc))
    real = _register(tmp_path, ["mdd"], config=config)
    assert real.domain["biomes"] == ["tropical moist forest"]
    near = choose_model(tmp_path, config.get("pando"))
    assert near.record == real and "same biome (tropical moist forest) in another country" in near.reason  # fmt: skip
    with pytest.raises(DetectionError, match=r"of its country \(SN\) or biome \(tropical grassland and savanna\)"):  # fmt: skip
        choose_model(tmp_path, config.get("kedougou"))
    with pytest.raises(DetectionError, match=r"or biome \(no `biome` set\)"):
        choose_model(tmp_path, config.get("nobiome"))
    with pytest.raises(RegionsError, match=r"regions\[0\] \(x\)\.biome: unknown biome 'rainforest': use one of tropical moist forest, tropical dry forest"):  # fmt: skip
        parse_regions(yaml.safe_load(f"regions:\n  - {{id: x, aoi: {BBOX}, periods: [2019], biome: rainforest}}"))  # fmt: skip
