"""Normalisation against real STAC responses in ../shared/data/stac (skipped without it)."""

from __future__ import annotations

import copy
import glob
import json
from pathlib import Path

import pytest
import shapely.geometry

from pipelines.stages.stac.normalize import (
    NormalizeError,
    drop_twins,
    normalize_item,
    normalize_items,
)
from tests.conftest import load_json, shared

ROLES = {"blue", "green", "red", "nir", "swir16", "swir22", "scl"}


def test_earth_search_v1_item() -> None:
    s = normalize_item(load_json("stac/earth-search-v1/item_S2A_32TMT_20200305_1_L2A.json"))
    assert set(s.assets) == ROLES
    assert s.mgrs_tile == "32TMT" and s.epsg == 32632 and s.processing_baseline == "05.00"
    assert s.assets["red"].href.endswith("/B04.tif")  # the COG, not the -jp2 twin
    assert s.assets["swir16"].href.endswith("/B11.tif") and s.assets["swir16"].resolution == 20
    assert (s.assets["red"].scale, s.assets["red"].offset) == (0.0001, -0.1)
    assert (s.assets["scl"].scale, s.assets["scl"].offset) == (1.0, 0.0)
    old = normalize_item(load_json("stac/earth-search-v1/item_S2A_32TMT_20200305_0_L2A.json"))
    assert old.processing_baseline == "02.14" and old.assets["nir"].offset == 0.0


def test_earth_search_v0_items_use_band_keys_and_product_id() -> None:
    s = normalize_item(load_json("stac/earth-search-v0/item_S2A_31NBJ_20190524_0_L2A.json"))
    assert set(s.assets) == ROLES
    assert s.assets["nir"].href.endswith("/B08.tif") and s.assets["scl"].href.endswith("/SCL.tif")
    assert s.mgrs_tile == "31NBJ"
    assert s.processing_baseline == "02.12"  # from sentinel:product_id ..._N0212_...
    assert (s.assets["red"].scale, s.assets["red"].offset) == (0.0001, 0.0)
    # Baseline 05.11, but Earth Search v0 already removed the offset from its COGs.
    page = load_json("stac/earth-search-v0/search-post_sentinel-s2-l2a-cogs_limit1.json")
    s2 = normalize_item(page["features"][0])
    assert s2.processing_baseline == "05.11" and s2.assets["red"].offset == 0.0
    assert s2.mgrs_tile == "20EPT"


def test_planetary_computer_items_without_raster_bands() -> None:
    s = normalize_item(
        load_json(
            "stac/planetary-computer/item_S2B_MSIL2A_20200705T101559_R065_T32TMT_20200825T083452.json"
        )
    )
    assert set(s.assets) == ROLES and s.mgrs_tile == "32TMT"
    assert s.assets["red"].href.split("?")[0].endswith("_B04_10m.tif")
    assert s.processing_baseline == "02.12" and s.assets["red"].offset == 0.0
    new = normalize_items(
        load_json(
            "stac/planetary-computer/items-list_sentinel-2-l2a_2024-04-19_pb05.10_4items.json"
        )
    )
    assert len(new.scenes) == 4
    for sc in new.scenes:
        assert sc.processing_baseline == "05.10"
        assert (sc.assets["nir"].scale, sc.assets["nir"].offset) == (0.0001, -0.1)


def test_planetary_computer_13_dates_of_35MNM_make_a_scene_list() -> None:
    ic = load_json(
        "stac/planetary-computer/itemcollection_35MNM_2020-06-01_to_07-31_13items.geojson"
    )
    r = normalize_items(ic["features"])
    assert len(r.scenes) == 13 and not r.dropped
    assert {s.mgrs_tile for s in r.scenes} == {"35MNM"}
    dates = [s.datetime for s in r.scenes]
    assert dates == sorted(dates) and len(set(dates)) == 13


def test_earth_search_2020_search_with_twins_yields_8_unique_scenes() -> None:
    items = []
    for f in sorted(
        glob.glob(str(shared("stac/earth-search-v1")) + "/search-post_bbox-9-47-10-48_*page*.json")
    ):
        items += json.loads(Path(f).read_text())["features"]
    assert len(items) == 16
    r = normalize_items(items)
    assert len(r.scenes) == 8
    assert all(s.id.endswith("_1_L2A") and s.processing_baseline == "05.00" for s in r.scenes)
    assert r.reasons == {"duplicate": 8}
    assert len({(s.mgrs_tile, s.datetime.date()) for s in r.scenes}) == 8


def test_l2a_and_c1_twins_and_other_collections() -> None:
    items = []
    for page in ("page1", "page2"):
        items += load_json(
            f"stac/earth-search-v1/search-post_cql2-cloudcover-lte40_2025-07-31.{page}.json"
        )["features"]
    r = normalize_items(items)
    assert all(s.collection == "sentinel-2-c1-l2a" for s in r.scenes)
    assert len({s.mgrs_tile for s in r.scenes}) == len(r.scenes)
    reasons = dict(r.dropped)
    assert "not a Sentinel-2 L2A item" in reasons["S2B_20EPT_20250731_0_L1C"]
    assert (
        "not a Sentinel-2 L2A item"
        in reasons["S1A_IW_GRDH_1SSH_20250731T135702_20250731T135722_060328_077F7E"]
    )
    assert reasons["S2B_20EPT_20250731_0_L2A"].startswith(
        "duplicate: twin of S2B_T20EPT_20250731T131905_L2A"
    )


def test_antimeridian_item() -> None:
    item = load_json(
        "stac/stactools-generated/item_S2A_T01KAB_20230821T221944_L2A_pb05.09_antimeridian.json"
    )
    s = normalize_item(item)
    assert s.mgrs_tile == "01KAB" and s.epsg == 32701 and s.processing_baseline == "05.09"
    assert s.assets["red"].offset == -0.1 and s.assets["red"].href.endswith("_B04_10m.jp2")
    assert s.assets["swir16"].href.endswith("_B11_20m.jp2")  # native 20 m, not the 60 m copy
    geom = shapely.geometry.shape(s.geometry)
    assert geom.geom_type == "MultiPolygon" and geom.is_valid
    assert s.bbox[0] > s.bbox[2]  # west > east: the bbox crosses the antimeridian
    # The canonical item keeps the split geometry and the crossing bbox.
    out = s.to_item()
    assert out["geometry"]["type"] == "MultiPolygon" and out["bbox"][0] > out["bbox"][2]


def test_unusable_items_are_named() -> None:
    item = load_json("stac/earth-search-v1/item_S2A_32TMT_20200305_1_L2A.json")
    broken = copy.deepcopy(item)
    del broken["assets"]["scl"]
    del broken["assets"]["scl-jp2"]
    broken["id"] = "S2A_32TMT_20200305_7_L2A"
    with pytest.raises(NormalizeError, match="S2A_32TMT_20200305_7_L2A: missing assets for scl"):
        normalize_item(broken)
    no_time = copy.deepcopy(item)
    no_time["properties"]["datetime"] = None
    with pytest.raises(NormalizeError, match="no datetime"):
        normalize_item(no_time)
    r = normalize_items([broken, item, item])
    assert len(r.scenes) == 1
    assert [reason.split(":")[0] for _, reason in r.dropped] == ["unusable", "duplicate"]


def test_twin_rule_prefers_highest_baseline_then_c1() -> None:
    a = normalize_item(load_json("stac/earth-search-v1/item_S2A_32TMT_20200305_0_L2A.json"))
    b = normalize_item(load_json("stac/earth-search-v1/item_S2A_32TMT_20200305_1_L2A.json"))
    kept, dropped = drop_twins([b, a])
    assert [s.id for s in kept] == [b.id] and dropped[0][0] == a.id
