"""The s2cloudless option: L1C twins found (real Earth Search responses and the embedded
server), the classifier run on them, and the composite masking what it finds."""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from scipy import ndimage

from pipelines.infra.layout import scenes_path
from pipelines.regions import Region, RegionsError, parse_regions
from pipelines.stages.composite import (
    COUNT_BAND,
    OUTPUT_BANDS,
    _s2cloudless_block,
    build_composite,
    load_stack,
    plan_observations,
    read_scene_items,
    region_geobox,
)
from pipelines.stages.scenes import find_scenes
from pipelines.stages.stac.l1c import S2CLOUDLESS_BANDS, pair_l1c
from pipelines.stages.stac.normalize import normalize_items
from tests.conftest import shared, small_region


def s2c_region() -> Region:
    return dataclasses.replace(small_region(seed=5), id="test-s2c", cloud_mask="scl+s2cloudless")


@pytest.fixture(scope="module")
def s2c_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Scenes of a simulated world with L1C twins, found through the real STAC server."""
    from pipelines.embedded.server import EmbeddedStacServer
    from pipelines.embedded.simulator import load_items, simulate_world
    from pipelines.stages.stac.geoparquet import write_geoparquet

    root = tmp_path_factory.mktemp("s2c")
    region = s2c_region()
    simulate_world(region, root / "world")
    gp = write_geoparquet(load_items(root / "world"), root / "serve" / "items.parquet")
    with EmbeddedStacServer(gp, root / "serve") as server:
        for period in region.periods:
            out = find_scenes(server.url, region, period, root, progress=lambda _m: None)
            assert out.count and out.result.l1c_unmatched == []
    yield root


def test_l1c_twins_pair_with_the_real_earth_search_scenes() -> None:
    raw: list[dict[str, Any]] = []
    for f in sorted(glob.glob(str(shared("stac/earth-search-v1")) + "/search-post_cql2-cloudcover-lte40_2025-07-31.page*.json")):  # fmt: skip
        raw += json.loads(Path(f).read_text())["features"]
    l1c = [i for i in raw if i["collection"] == "sentinel-2-l1c"]
    scenes = normalize_items(raw).scenes  # L1C and S1 items are dropped here
    paired = pair_l1c(scenes, l1c)
    by_tile = {s.mgrs_tile: s for s in paired.scenes}
    assert {s.mgrs_tile for s in paired.scenes if s.l1c_assets} == {
        i["id"].split("_")[1] for i in l1c
    }
    assert paired.unmatched == [s.id for s in paired.scenes if not s.l1c_assets] != []
    s = by_tile["24MVV"]
    assert s.l1c_id == "S2B_24MVV_20250731_0_L1C"
    assert set(s.l1c_assets) == set(S2CLOUDLESS_BANDS)
    b10 = s.l1c_assets["B10"]
    assert b10.href.endswith("/B10.jp2") and b10.resolution == 60
    assert (b10.scale, b10.offset) == (1e-4, -0.1), "baseline 05.11: RADIO_ADD_OFFSET"
    item = s.to_item()
    assert item["assets"]["l1c_B10"]["href"] == b10.href
    assert item["properties"]["asmwatch:l1c_id"] == s.l1c_id


def test_cloud_mask_option_is_validated() -> None:
    base = {"id": "r", "aoi": {"bbox": [10, 5, 11, 6]}, "periods": [2021]}
    ok = parse_regions({"regions": [base | {"cloud_mask": "scl+s2cloudless"}]}, "x")
    assert ok.regions[0].uses_s2cloudless
    with pytest.raises(RegionsError, match=r"cloud_mask: unknown cloud mask 'fmask'"):
        parse_regions({"regions": [base | {"cloud_mask": "fmask"}]}, "x")
    with pytest.raises(RegionsError, match="Planetary Computer does not serve"):
        parse_regions(
            {"regions": [base | {"cloud_mask": "scl+s2cloudless", "source": "planetary-computer"}]},
            "x",
        )


def test_s2cloudless_finds_the_clouds_and_leaves_the_mines(s2c_root: Path) -> None:
    region = s2c_region()
    items = read_scene_items(scenes_path(s2c_root, region.id, "2019"))
    geobox = region_geobox(region)
    tagged, obs = plan_observations(items, lon=-70.54)
    assert all(o.l1c_offset for o in obs), "every observation has its L1C twin"
    ds = load_stack(tagged, geobox, chunk=512, s2cloudless=True).compute(scheduler="threads")
    l1c = [ds[f"l1c_{b}"].values for b in S2CLOUDLESS_BANDS]
    cloud = _s2cloudless_block(l1c, obs)
    scl = ds["scl"].values
    with rasterio.open(s2c_root / "world" / "truth" / "2019.tif") as t:
        mining = np.zeros(geobox.shape.yx, np.uint8)
        rasterio.warp.reproject(t.read(1), mining, src_transform=t.transform, src_crs=t.crs,
                                dst_transform=geobox.affine, dst_crs=t.crs)  # fmt: skip
    cloudy_scenes = 0
    for i in range(len(obs)):
        thick = np.isin(scl[i], (8, 9))
        if thick.sum() < 500:
            continue
        cloudy_scenes += 1
        assert cloud[i][thick].mean() > 0.95, "s2cloudless sees the thick clouds"
        # Far (> 300 m) from anything SCL calls cloud, shadow or cirrus: hardly flagged,
        # and bright mining sediment is not taken for cloud.
        far = ndimage.distance_transform_edt(~np.isin(scl[i], (3, 8, 9, 10))) > 30
        assert cloud[i][far].mean() < 0.02
        assert cloud[i][far & (mining == 1)].mean() < 0.02
    assert cloudy_scenes >= 1


def test_composite_with_s2cloudless_masks_more_never_less(s2c_root: Path, tmp_path: Path) -> None:
    region = s2c_region()
    items = read_scene_items(scenes_path(s2c_root, region.id, "2020"))
    geobox = region_geobox(region)
    scl_only = build_composite(items, geobox, tmp_path / "scl.tif", chunk=128)
    both = build_composite(items, geobox, tmp_path / "s2c.tif", chunk=128, cloud_mask="scl+s2cloudless")  # fmt: skip
    assert (both.cloud_mask, both.l1c_scenes) == ("scl+s2cloudless", len(items))
    assert scl_only.cloud_mask == "scl" and scl_only.l1c_scenes == 0
    i = OUTPUT_BANDS.index(COUNT_BAND) + 1
    with rasterio.open(scl_only.path) as a, rasterio.open(both.path) as b:
        c_scl, c_both = a.read(i), b.read(i)
        assert b.tags()["asmwatch_cloud_mask"] == "scl+s2cloudless"
    assert (c_both <= c_scl).all()
    removed = (c_scl - c_both).sum() / c_scl.sum()
    assert 0.005 < removed < 0.25, removed


def test_unreadable_l1c_twin_falls_back_to_scl(s2c_root: Path, tmp_path: Path) -> None:
    region = s2c_region()
    items = read_scene_items(scenes_path(s2c_root, region.id, "2021"))
    items = [json.loads(json.dumps(i)) for i in items]
    items[0]["assets"]["l1c_B10"]["href"] = (tmp_path / "gone" / "B10.tif").as_uri()
    messages: list[str] = []
    res = build_composite(items, region_geobox(region), tmp_path / "c.tif", chunk=256,
                          cloud_mask="scl+s2cloudless", progress=messages.append)  # fmt: skip
    assert res.skipped == [] and res.l1c_scenes == len(items) - 1
    assert len(res.l1c_notes) == 1 and items[0]["id"] in res.l1c_notes[0]
    assert "B10.tif" in res.l1c_notes[0] and any("SCL only" in m for m in messages)
