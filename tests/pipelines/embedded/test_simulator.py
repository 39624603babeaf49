"""The embedded Sentinel-2 world looks like Sentinel-2 to the rest of the pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipelines.embedded.simulator import load_items, simulate_world
from pipelines.embedded.simulator.landscape import Cover, build_landscape
from pipelines.embedded.simulator.scenes import Acquisition
from pipelines.stages.stac.normalize import normalize_items
from tests.conftest import small_region


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _reflectance(world: Path, item: dict, key: str) -> np.ndarray:
    a = item["assets"][key]
    band = a["raster:bands"][0]
    dn = _read(world / "items" / a["href"]).astype(float)
    return dn * band["scale"] + band["offset"]


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, small_world: Path) -> None:
    again = tmp_path / "again"
    simulate_world(small_region(), again)
    a, b = _digest(small_world), _digest(again)
    assert a == b and len(a) > 30
    other = tmp_path / "other"
    simulate_world(small_region(seed=8), other)
    c = _digest(other)
    differing = [k for k in a if k.endswith(".tif") and a[k] != c.get(k)]
    assert len(differing) > 10


def test_items_follow_earth_search_v1(small_world: Path) -> None:
    items = [json.loads(p.read_text()) for p in sorted((small_world / "items").glob("*.json"))]
    assert len(items) == 3 * 3 + 3  # 3 periods x 3 scenes, plus one _1_ twin per period
    for it in items:
        assert set(it["assets"]) == {"blue", "green", "red", "nir", "swir16", "swir22", "scl"}
        p = it["properties"]
        assert p["grid:code"] == "MGRS-19LCF" and p["proj:epsg"] == 32719
        assert 0 <= p["eo:cloud_cover"] <= 100
        for key in ("red", "swir16"):
            band = it["assets"][key]["raster:bands"][0]
            expected = -0.1 if float(p["s2:processing_baseline"]) >= 4 else 0.0
            assert band["scale"] == 0.0001 and band["offset"] == expected
        # 10 m and 20 m grids of the real tile: origin on multiples of 20 m.
        t10 = it["assets"]["red"]["proj:transform"]
        t20 = it["assets"]["swir16"]["proj:transform"]
        assert t10[0] == 10 and t20[0] == 20 and t10[2] == t20[2] and t10[2] % 20 == 0
    # The COGs are real: tiled, deflate, with overviews, on the declared grid.
    it = items[0]
    path = small_world / "items" / it["assets"]["red"]["href"]
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32719
        assert src.profile["compress"].lower() == "deflate" and src.profile["tiled"]
        assert src.overviews(1)
        assert list(src.transform)[:6] == it["assets"]["red"]["proj:transform"]
        assert [src.height, src.width] == it["assets"]["red"]["proj:shape"]


def test_ndvi_forest_high_mining_sediment_low(small_world: Path) -> None:
    items = load_items(small_world)
    scene = min(
        (i for i in items if i["id"].endswith("_0_L2A")),
        key=lambda i: i["properties"]["eo:cloud_cover"],
    )
    world = small_world
    raw = json.loads((world / "items" / f"{scene['id']}.json").read_text())
    red = _reflectance(world, raw, "red")
    nir = _reflectance(world, raw, "nir")
    ndvi = (nir - red) / (nir + red)
    scl = _read(world / "items" / raw["assets"]["scl"]["href"])
    clear = np.kron(scl, np.ones((2, 2), dtype=np.uint8)) < 7  # 20 m SCL to the 10 m grid
    region = small_region()
    period = int(scene["properties"]["datetime"][:4]) - 2019
    with build_landscape(region.embedded.seed, red.shape, 3, 1.5) as land:  # type: ignore[union-attr]
        cover = land.cover(period)
    forest = (cover == Cover.FOREST) & clear
    sediment = (cover == Cover.SEDIMENT) & clear
    assert forest.sum() > 1000 and sediment.sum() > 100
    assert np.median(ndvi[forest]) > 0.7
    assert np.median(ndvi[sediment]) < 0.3
    assert np.mean(ndvi[forest] > 0.7) > 0.9
    assert np.mean(ndvi[sediment] < 0.3) > 0.9


def test_scl_marks_clouds_where_the_clouds_are(small_world: Path) -> None:
    raw = [json.loads(p.read_text()) for p in sorted((small_world / "items").glob("*.json"))]
    cloudy = max(raw, key=lambda i: i["properties"]["eo:cloud_cover"])
    assert cloudy["properties"]["eo:cloud_cover"] > 20
    blue = _reflectance(small_world, cloudy, "blue")[::2, ::2]  # onto the 20 m SCL grid
    scl = _read(small_world / "items" / cloudy["assets"]["scl"]["href"])
    thick = np.isin(scl, (8, 9))
    clear = np.isin(scl, (4, 5, 6))
    assert thick.sum() > 100 and clear.sum() > 100
    # Clouds are bright in blue; clear land and water are dark.
    assert np.median(blue[thick]) > 0.3 > 0.15 > np.median(blue[clear])
    assert np.mean(blue[thick] > 0.2) > 0.95
    # eo:cloud_cover is the share of SCL cloud classes.
    share = np.isin(scl, (8, 9, 10)).mean() * 100
    assert abs(share - cloudy["properties"]["eo:cloud_cover"]) < 0.01
    # Cloud shadows (SCL 3) are darker than the clear scene.
    shadow = scl == 3
    nir = _reflectance(small_world, cloudy, "nir")[::2, ::2]
    assert shadow.sum() > 20 and np.median(nir[shadow]) < 0.6 * np.median(nir[scl == 4])


def test_mining_grows_as_configured_and_old_land_revegetates(small_world: Path) -> None:
    info = json.loads((small_world / "world.json").read_text())
    ha = info["mining_ha"]
    assert ha["2021"] / ha["2019"] == pytest.approx(1.5, rel=0.02)
    assert ha["2019"] < ha["2020"] < ha["2021"]
    truth = {p: _read(small_world / "truth" / f"{p}.tif") for p in ("2019", "2020", "2021")}
    pixel_ha = 0.01
    assert (truth["2021"] == 1).sum() * pixel_ha == pytest.approx(ha["2021"])
    # Re-vegetating land was mined in the first period and is not mining later.
    reveg = truth["2021"] == 2
    assert reveg.sum() > 0 and (truth["2019"][reveg] == 1).all()
    assert (truth["2019"] == 2).sum() == 0


def test_growth_factor_is_honoured() -> None:
    with build_landscape(3, (200, 240), 4, 2.0) as land:
        areas = [land.mining_pixels(p) for p in range(4)]
        assert areas == [int(land.mining(p).sum()) for p in range(4)]
    assert areas[-1] / areas[0] == pytest.approx(2.0, rel=0.03)
    assert all(a < b for a, b in itertools.pairwise(areas))


def test_context_layers_are_consistent_with_the_scene(small_world: Path) -> None:
    ctx = small_world / "context"
    conc = json.loads((ctx / "concessions.geojson").read_text())
    assert len(conc["features"]) >= 2
    assert len({f["properties"]["concession_id"] for f in conc["features"]}) == len(
        conc["features"]
    )
    for name in ("protected_areas.geojson", "indigenous_lands.geojson", "settlements.geojson"):
        assert json.loads((ctx / name).read_text())["features"]
    lines = (ctx / "grievances.csv").read_text().splitlines()
    assert lines[0].startswith("grievance_id,date,lon,lat,category")
    assert len(lines) > 3
    # Everything lies within the world's footprint.
    import shapely.geometry

    item = load_items(small_world)[0]
    footprint = shapely.geometry.shape(item["geometry"])
    for f in conc["features"]:
        assert footprint.buffer(1e-6).contains(shapely.geometry.shape(f["geometry"]))


def test_twins_normalise_to_one_scene_per_acquisition(small_world: Path) -> None:
    result = normalize_items(load_items(small_world))
    assert len(result.scenes) == 9
    assert result.reasons == {"duplicate": 3}
    kept_twins = [s for s in result.scenes if s.id.endswith("_1_L2A")]
    assert len(kept_twins) == 3 and all(s.processing_baseline == "05.00" for s in kept_twins)
    assert all(s.assets["red"].offset == -0.1 for s in kept_twins)


@pytest.mark.slow
def test_a_world_written_strip_by_strip_is_the_whole_array_world(
    tmp_path: Path, small_world: Path
) -> None:
    """Strips of 12 rows (an L1C twin too: 60 m pixels span strips' edges) give the
    same bytes as the one-strip world, and leave no scratch behind."""
    with rasterio.open(small_world / "truth" / "2019.tif") as src:
        width = src.width
    strips = tmp_path / "strips"
    simulate_world(small_region(), strips, strip_px=12 * width)
    assert _digest(strips) == _digest(small_world)
    assert [p.name for p in tmp_path.iterdir()] == ["strips"]  # the scratch is gone

    region = dataclasses.replace(
        small_region(seed=5, periods=("2020",)), cloud_mask="scl+s2cloudless"
    )
    one, many = tmp_path / "one", tmp_path / "many"
    simulate_world(region, one)
    simulate_world(region, many, strip_px=18 * width)
    digest = _digest(one)
    assert any("L1C" in k and k.endswith("B01.tif") for k in digest)
    assert _digest(many) == digest


def test_a_failed_simulation_leaves_the_old_world_and_no_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    region = small_region(periods=("2020",))
    world = tmp_path / "world"
    simulate_world(region, world)
    before = _digest(world)

    def broken(self: Acquisition, r0: int, r1: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(Acquisition, "strip", broken)
    with pytest.raises(OSError, match="disk gone"):
        simulate_world(small_region(seed=9, periods=("2020",)), world, strip_px=50_000)
    assert _digest(world) == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]
