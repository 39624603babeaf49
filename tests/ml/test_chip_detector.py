"""The chip classifier as a product detector (issue 19, item 4): registered with its
domain, chosen by a region's ``model: <id>``, applied to a composite's RGB bands as the
chips were rendered, and marked ``screening``.

The composite is a mosaic of real AMW chips taken back to L2A reflectance by the
inverse of the rendering, so the detector must give each chip's own probability at the
block centred on it: that checks the rendering, the window alignment and the tiling
together. Skips without ../shared/data.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin

from ml import registry
from ml.chips import (
    CHIP,
    Chips,
    dark_object_offsets,
    load_chips,
    predict,
    register_product,
    render,
    split,
    unrender,
)
from pipelines.infra.layout import composite_path
from pipelines.regions import parse_regions
from pipelines.stages.detection import DetectionError, choose_model, map_probability
from tests.conftest import shared

BBOX = "{bbox: [-70.6, -13.0, -70.5, -12.9]}"
GRID = 6  # chips per side of the mosaic
MARGIN = 12  # px: windows of the 24 px blocks then start where the chips do


def _regions(model: str) -> Any:
    doc = f"""
regions:
  - {{id: mdd-screen, aoi: {BBOX}, periods: [2024], country: PE, model: {model}}}
  - {{id: kwale, aoi: {BBOX}, periods: [2024], country: KE, model: {model}}}
  - {{id: mdd-auto, aoi: {BBOX}, periods: [2024], country: PE}}
"""
    return parse_regions(yaml.safe_load(doc))


@pytest.fixture(scope="module")
def chips() -> Chips:
    return load_chips(shared("chips"))


@pytest.fixture(scope="module")
def chip_model(chips: Chips, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Chips]:
    """A chip model trained briefly (2 epochs) on a subsample and registered."""
    rng = np.random.default_rng(3)
    sp = split(chips, 0)
    parts = [rng.choice(sp.train, 900, replace=False), sp.val[:150], sp.mines[:40], sp.random[:60], sp.hard[:40]]  # fmt: skip
    keep = np.sort(np.concatenate(parts))
    sub = Chips(chips.x[keep], chips.y[keep], [chips.gallery[i] for i in keep])
    root = tmp_path_factory.mktemp("chiproot")
    record = register_product(root, sub, shared("chips"), seeds=1, epochs=2, say=lambda _m: None)
    return root, record, sub


def test_the_rendering_is_the_chips_and_its_offsets_are_measured(chips: Chips) -> None:
    off = dark_object_offsets(chips)
    # What L1C adds to L2A over the Amazon (B04, B03, B02): largest in blue, as
    # Rayleigh scattering is (single-scattering estimate: about 0.017, 0.034, 0.059).
    assert off[2] > off[1] > off[0] > 0
    assert 0.01 < off[0] < 0.03 and 0.025 < off[1] < 0.045 and 0.04 < off[2] < 0.065
    x = chips.x[:200]
    back = render(unrender(x, off), off)
    assert np.array_equal(np.rint(back * 255).astype(np.uint8), x)
    # NaN (no clear look) stays NaN; bright ground saturates at 255 as in the chips.
    img = np.full((3, 2, 2), 0.5, np.float32)
    img[:, 0, 0] = np.nan
    out = render(img, off)
    assert np.isnan(out[:, 0, 0]).all() and (out[:, 1, 1] == 1.0).all()


def test_the_chip_model_is_registered_with_its_domain_and_held_out_figures(
    chip_model: tuple[Path, Any, Chips],
) -> None:
    root, record, _sub = chip_model
    assert record.kind == "chips" and record.model_id.startswith("chips-")
    assert record.domain["imagery"] == "real" and record.domain["screening"] is True
    assert record.domain["bands"] == ["B04", "B03", "B02"] and "PE" in record.domain["countries"]
    assert not any("BD_MineriaAurifera" in s for s in record.domain["sources"]), "held out"
    held = record.metrics["heldout"]
    assert set(held) == {"sensitivity", "specificity_random", "specificity_hard"}
    assert 0 < record.metrics["threshold"] < 1
    cost = record.metrics["conversion_cost"]
    assert len(cost) == 9 and [c["offset_error"] for c in cost[:7]] == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]  # fmt: skip
    assert cost[3]["sensitivity"] == held["sensitivity"]  # error 0: the held-out figure itself
    # From the training chips' random landscapes (a subsample here): near the whole set's.
    assert np.allclose(record.config["rendering"]["offsets"], dark_object_offsets(load_chips(shared("chips"))), atol=0.01)  # fmt: skip
    assert [r.model_id for r in registry.records(root)] == [record.model_id]
    assert registry.checkpoint_problem(root, record) is None
    # Unchanged chips and settings find the registered model instead of training again.
    said: list[str] = []
    again = register_product(root, chip_model[2], shared("chips"), seeds=1, epochs=2, say=said.append)  # fmt: skip
    assert again == record and said == [f"chip model {record.model_id} is registered for these chips and settings; reused"]  # fmt: skip
    assert len(registry.records(root)) == 1


def test_the_threshold_sweep_shows_the_trade_off_of_the_registered_model(
    chip_model: tuple[Path, Any, Chips], tmp_path: Path
) -> None:
    """At each threshold, the held-out figures the registry records at the model's own,
    and how many validation look-alikes fire: fewer as the threshold rises."""
    from ml.chips import random_negative_mask, sweep_table, threshold_sweep

    root, record, sub = chip_model
    own = float(record.metrics["threshold"])
    model = registry.load_chip_model(root, record)
    rows = threshold_sweep(model, sub, [0.3, own, 0.9])
    assert {k: rows[1][k] for k in record.metrics["heldout"]} == record.metrics["heldout"]
    sp = split(sub, 0)
    look = int(((sub.y[sp.val] == 0) & ~random_negative_mask(sub)[sp.val]).sum())
    assert look > 0 and all(r["lookalikes"] == look for r in rows)
    for lo, hi in itertools.pairwise(rows):
        assert hi["sensitivity"] <= lo["sensitivity"] and hi["lookalikes_firing"] <= lo["lookalikes_firing"]  # fmt: skip
        assert hi["specificity_random"] >= lo["specificity_random"]
    text = sweep_table(root, record.model_id, sub)
    assert f"| {own:.3f} (its own) |" in text and text.count("\n") == 2 + len({0.5, 0.6, 0.7, 0.8, round(own, 4)})  # fmt: skip
    with pytest.raises(SystemExit, match="no model 'chips-nope' is registered under"):
        sweep_table(root, "chips-nope", sub)
    # A segmentation model has no screening threshold to sweep: refused, by kind.
    from torch import nn

    from ml.features import Normalizer
    from ml.models import UnetSpec

    unet = registry.register(
        tmp_path, nn.Conv2d(1, 1, 1), UnetSpec(), Normalizer((0.0,) * 9, (1.0,) * 9),
        input_hash_="unet", device="cpu", seconds=1.0, train_data=[], metrics={"threshold": 0.5},
        config={}, domain=None,
    )  # fmt: skip
    with pytest.raises(SystemExit, match="is a unet model, not a screening detector"):
        sweep_table(tmp_path, unet.model_id, sub)


def test_a_region_chooses_the_chip_model_only_by_name(chip_model: tuple[Path, Any, Chips]) -> None:
    root, record, _sub = chip_model
    config = _regions(record.model_id)
    chosen = choose_model(root, config.get("mdd-screen"))
    assert chosen.record == record and "SCREENING" in chosen.reason
    assert "outside its countries" not in chosen.reason
    assert "outside its countries" in choose_model(root, config.get("kwale")).reason
    # `auto` chooses among segmentation models: the refusal names the screening option.
    with pytest.raises(DetectionError, match=rf"no registered model was trained on it.*for screening .*`model: {record.model_id}`"):  # fmt: skip
        choose_model(root, config.get("mdd-auto"))


def _mosaic(root: Path, chips: Chips, picks: np.ndarray, offsets: tuple[float, ...]) -> Path:
    """A composite COG of the chips ``picks`` (GRID x GRID, MARGIN px from the edges) in
    L2A reflectance; the other bands are constants the detector must not read."""
    size = 2 * MARGIN + GRID * CHIP
    rgb = np.full((3, size, size), 0.05, np.float32)
    for n, i in enumerate(picks):
        r, c = divmod(n, GRID)
        rgb[:, MARGIN + r * CHIP : MARGIN + (r + 1) * CHIP, MARGIN + c * CHIP : MARGIN + (c + 1) * CHIP] = unrender(chips.x[i], offsets)  # fmt: skip
    # No clear look: the last chip wholly, and a strip over a fifth of the first.
    rgb[:, MARGIN + (GRID - 1) * CHIP : MARGIN + GRID * CHIP, MARGIN + (GRID - 1) * CHIP : MARGIN + GRID * CHIP] = np.nan  # fmt: skip
    rgb[:, MARGIN : MARGIN + 10, MARGIN : MARGIN + CHIP] = np.nan
    names = ["B02", "B03", "B04", "B08", "B11", "B12", "clear_count", "NDVI", "MNDWI", "BSI"]
    bands = {"B04": rgb[0], "B03": rgb[1], "B02": rgb[2]}
    path = composite_path(root, "mdd-screen", "2024")
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": len(names), "dtype": "float32",
        "crs": "EPSG:32719", "transform": from_origin(400000, 8560000, 10, 10), "nodata": float("nan"),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for k, name in enumerate(names, start=1):
            dst.write(bands.get(name, np.full((size, size), 0.2, np.float32)), k)
            dst.set_band_description(k, name)
    return path


def test_the_screening_map_gives_each_chip_its_own_probability_whatever_the_tiles(
    chips: Chips, chip_model: tuple[Path, Any, Chips]
) -> None:
    root, record, _sub = chip_model
    offsets = tuple(record.config["rendering"]["offsets"])
    sp = split(chips, 0)
    picks = np.concatenate([sp.mines[::40][:18], sp.random[::15][:18]])
    np.random.default_rng(0).shuffle(picks)
    _mosaic(root, chips, picks, offsets)
    region = _regions(record.model_id).get("mdd-screen")
    lines: list[str] = []
    maps = []
    for tile_px in (64, 1024):
        res = map_probability(root, region, "2024", record=record, tile_px=tile_px, progress=lines.append)  # fmt: skip
        assert res.screening and res.detector == record.model_id
        assert res.threshold == pytest.approx(record.metrics["threshold"])
        with rasterio.open(res.path) as src:
            maps.append(src.read(1))
            tags = src.tags()
    assert res.tiles == 1
    assert any("SCREENING" in line and "upper bound" in line for line in lines)
    assert tags["asmwatch_screening"] == "true" and tags["asmwatch_model_kind"] == "chips"
    assert tags["asmwatch_screening_block_px"] == "24" and "offsets" in tags["asmwatch_rendering"]
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)  # 64 px tiles as one tile
    prob = maps[1]
    expected = predict(registry.load_chip_model(root, record), chips.x[picks])
    for n, _i in enumerate(picks[:-1]):
        r, c = divmod(n, GRID)
        # The block centred on the chip: rows and cols [48 n + 24, 48 n + 48).
        block = prob[CHIP * r + 24 : CHIP * r + 48, CHIP * c + 24 : CHIP * c + 48]
        if n == 0:  # a fifth missing: still screened (the missing pixels take the mean colour)
            assert np.isfinite(block).all()
            continue
        assert np.allclose(block, expected[n], atol=1e-5), (n, float(block.mean()), float(expected[n]))  # fmt: skip
    # The chip without a clear look stays NaN; the strip is NaN pixel by pixel.
    last = MARGIN + (GRID - 1) * CHIP
    assert np.isnan(prob[last : last + CHIP, last : last + CHIP]).all()
    assert np.isnan(prob[MARGIN : MARGIN + 10, MARGIN : MARGIN + CHIP]).all()
    assert np.isfinite(prob[:MARGIN]).all(), "the raster's edge is screened (mirrored)"
    # The report's methods say it is a screening, with the model's held-out figures.
    from pipelines.i18n import Lang
    from pipelines.stages.reports import RegionData, detector_text

    data = RegionData(region, ["2024"], [], {}, {}, {}, {}, {"2024": []})
    text = detector_text(root, data)
    h = record.metrics["heldout"]
    assert tags["asmwatch_screening_members"] == "1" and tags["asmwatch_screening_trees"] == "false"
    assert text.startswith(f"Possible mining was screened, not mapped, by a screening chip classifier ({record.model_id}; one small convolutional network) trained on real Sentinel-2 RGB image chips of Amazon basin")  # fmt: skip
    assert "each 240 m square" in text and "upper bound of the mined land" in text
    assert f"it found {Lang('en').percent(h['sensitivity'], 1)} of mines" in text
    assert "cada cuadrado de 240 m" in detector_text(root, data, Lang("es"))
    # Sites from a screening map say so: an analyst reading asm_sites sees `screening`.
    from pipelines.stages.sites import extract_sites

    # (at the map's median: a model trained for two epochs flags little at its own threshold)
    sites = extract_sites(res.path, region.id, "2024", mmu_ha=0.0, threshold=float(np.nanmedian(prob)))  # fmt: skip
    assert len(sites) and set(sites["source"]) == {"screening"}


def test_a_damaged_chip_checkpoint_is_refused_naming_the_file(
    chip_model: tuple[Path, Any, Chips], tmp_path: Path
) -> None:
    import shutil

    root, record, _sub = chip_model
    shutil.copytree(root / "models", tmp_path / "models")
    ckpt = registry.checkpoint_file(tmp_path, record)
    ckpt.write_bytes(b"not a checkpoint")
    problem = registry.checkpoint_problem(tmp_path, record)
    assert problem is not None and f"{ckpt}, is damaged and cannot be loaded" in problem
    with pytest.raises(registry.RegistryError, match="retrain"):
        registry.load_chip_model(tmp_path, record)


def test_the_asset_screens_a_real_region_that_names_the_chip_model(
    chips: Chips, chip_model: tuple[Path, Any, Chips], tmp_path: Path
) -> None:
    """`mining_probability` materialised in-process: the region's `model: <chip id>`."""
    import shutil

    from assets.detection import mining_probability
    from assets.partitions import partition_key
    from assets.resources import TorchResource
    from tests.assets.test_composite_asset import _meta, _resources
    from tests.conftest import materialize

    src_root, record, _sub = chip_model
    data = tmp_path / "data"
    shutil.copytree(src_root / "models", data / "models")
    sp = split(chips, 0)
    _mosaic(data, chips, np.concatenate([sp.mines[:18], sp.random[:18]]), tuple(record.config["rendering"]["offsets"]))  # fmt: skip
    regions = tmp_path / "regions.yaml"
    doc = {"regions": [{"id": "mdd-screen", "aoi": {"bbox": [-70.6, -13.0, -70.5, -12.9]}, "periods": [2024], "country": "PE", "model": record.model_id}]}  # fmt: skip
    regions.write_text(yaml.safe_dump(doc))
    res = {**_resources(tmp_path, regions), "torch_device": TorchResource(device="cpu")}
    run = materialize([mining_probability], partition_key=partition_key("mdd-screen", "2024"), resources=res)  # fmt: skip
    assert run.success
    m = _meta(run, "mining_probability")
    assert m["screening"] is True and m["detector"] == record.model_id
    assert "SCREENING chip classifier" in str(m["model_choice"])
    assert m["model_domain"]["imagery"] == "real"  # type: ignore[index]
    assert (data / "probability" / "mdd-screen" / "2024.tif").exists()


def test_a_product_of_the_cnn_and_its_trees_screens_as_it_was_measured(
    chips: Chips, chip_model: tuple[Path, Any, Chips], tmp_path: Path
) -> None:
    """`--register ROOT --trees`: one CNN and gradient-boosted trees, stacked on the
    validation chips, registered as one detector (the trees as LightGBM's text), found
    again by its settings; the reloaded detector gives the held-out figures it was
    registered with, votes as `stacked` does, and maps a composite as it scores chips."""
    from ml.chips import Hybrid, _at, chip_features, held_out_probs, stacked

    _root, cnn_record, sub = chip_model
    root = tmp_path / "root"
    record = register_product(root, sub, shared("chips"), seeds=1, epochs=2, trees=True, say=lambda _m: None)  # fmt: skip
    assert record.model_id != cnn_record.model_id and record.metrics["trees"] is True
    assert record.config["trees"] is True and "trees" not in cnn_record.config
    assert registry.checkpoint_problem(root, record) is None
    model = registry.load_chip_model(root, record)
    assert isinstance(model, Hybrid)
    vote = record.metrics["vote"]
    assert len(vote) == 3 and vote[1] > 0, "the trees have a say, for mining where they see it"
    # The reloaded detector (weights and the trees' text) scores the held-out chips as
    # the one that was registered did, figure for figure.
    sp = split(sub, 0)
    prob = held_out_probs(model, sub, sp)
    assert _at(prob, sp, float(record.metrics["threshold"])) == record.metrics["heldout"]
    # Its probability is the stack of its CNN's and its trees'.
    x = sub.x[sp.mines[:20]]
    p_cnn = predict(model.cnn, x)
    p_trees = model._booster.predict(chip_features(x)).astype(np.float32)
    np.testing.assert_allclose(predict(model, x), stacked(np.asarray(vote), p_cnn, p_trees), atol=1e-5)  # fmt: skip
    # Unchanged settings find it again.
    said: list[str] = []
    again = register_product(root, sub, shared("chips"), seeds=1, epochs=2, trees=True, say=said.append)  # fmt: skip
    assert again == record and "reused" in said[0]
    # Mapped over a composite of real chips, each chip's block is its probability,
    # whatever the tiles.
    offsets = tuple(record.config["rendering"]["offsets"])
    picks = np.concatenate([sp.mines[:18], sp.random[:18]])
    _mosaic(root, sub, picks, offsets)
    region = _regions(record.model_id).get("mdd-screen")
    maps = []
    for tile_px in (64, 1024):
        res = map_probability(root, region, "2024", record=record, tile_px=tile_px, progress=lambda _m: None)  # fmt: skip
        assert res.screening
        with rasterio.open(res.path) as src:
            maps.append(src.read(1))
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)
    expected = predict(model, sub.x[picks])
    for n in range(1, len(picks) - 1):
        r, c = divmod(n, GRID)
        block = maps[1][CHIP * r + 24 : CHIP * r + 48, CHIP * c + 24 : CHIP * c + 48]
        assert np.allclose(block, expected[n], atol=1e-5), (n, float(block.mean()), float(expected[n]))  # fmt: skip
    # The report's methods say what the detector is made of: its CNN and its trees.
    from pipelines.i18n import Lang
    from pipelines.stages.reports import RegionData, detector_text

    data = RegionData(region, ["2024"], [], {}, {}, {}, {}, {"2024": []})
    made = "one small convolutional network and gradient-boosted trees on the colour and texture of each window, their votes combined"  # fmt: skip
    assert f"({record.model_id}; {made})" in detector_text(root, data)
    fr = detector_text(root, data, Lang("fr"))
    assert f"({record.model_id} ; un petit réseau convolutif et des arbres de décision" in fr


def test_the_methods_name_what_a_screening_detector_is_made_of() -> None:
    """From its map's tags: the number of CNNs and whether trees vote beside them; a map
    written before those tags says the make-up was not recorded rather than guess."""
    from pipelines.i18n import Lang
    from pipelines.stages.reports import screening_words

    en, es = Lang("en"), Lang("es")
    assert screening_words(en, "5", "false") == "the mean of 5 small convolutional networks"
    assert screening_words(en, "1", "false") == "one small convolutional network"
    assert screening_words(en, "3", "true").startswith("3 small convolutional networks and gradient-boosted trees")  # fmt: skip
    assert screening_words(es, "5", "false") == "la media de 5 pequeñas redes convolucionales"
    for members, trees in (
        (None, "true"),
        ("5", None),
        ("5", "yes"),
        ("five", "false"),
        ("0", "true"),
    ):
        assert screening_words(en, members, trees) == "its make-up not recorded with the map"
