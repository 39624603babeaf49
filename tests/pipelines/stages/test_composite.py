"""The composite stage on real files: the embedded world through the real STAC server,
hand-made scenes in two UTM zones, and the real Earth Search tile 29RKH."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from pipelines.infra.layout import scenes_path
from pipelines.stages.composite import (
    COUNT_BAND,
    MASKED_SCL,
    OUTPUT_BANDS,
    REFLECTANCE_BANDS,
    CompositeError,
    aoi_mask,
    build_composite,
    composite_for_region,
    load_stack,
    naive_composite,
    plan_observations,
    read_scene_items,
    region_geobox,
)
from tests.conftest import constant_scene, real_tile_items, shared, small_region

BAND = {name: i for i, name in enumerate(OUTPUT_BANDS)}


def _read(path: Path) -> tuple[np.ndarray, Any]:
    with rasterio.open(path) as src:
        return src.read(), src.profile | {"tags": src.tags(), "desc": src.descriptions,
                                          "overviews": src.overviews(1)}  # fmt: skip


def test_small_world_composite_matches_naive_median_and_sees_the_mines(
    small_scenes_root: Path, small_world: Path, tmp_path: Path
) -> None:
    region = small_region()
    period = region.period("2021")
    items = read_scene_items(scenes_path(small_scenes_root, region.id, period.id))
    out = tmp_path / "c.tif"
    geobox = region_geobox(region)
    res = build_composite(
        items, geobox, out, region=region.id, period=period.id, aoi=region.geometry, chunk=128
    )
    data, prof = _read(out)
    assert data.shape == (len(OUTPUT_BANDS), *geobox.shape.yx)
    assert prof["crs"].to_epsg() == 32719 and prof["transform"].a == 10.0
    assert prof["desc"] == OUTPUT_BANDS and prof["overviews"], "named bands and overviews"
    assert prof["tiled"] and prof["compress"] == "zstd"
    with rasterio.open(out) as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert prof["tags"]["asmwatch_empty"] == "false"
    assert set(prof["tags"]["asmwatch_scenes"].split(",")) == set(res.scenes_used)

    # Same numbers as the hand-written xarray median on the same loaded stack.
    tagged, obs = plan_observations(items, lon=-70.54)
    assert {o.offset["B04"] for o in obs} == {0.0, -0.1}, "the world mixes baselines"
    ds = load_stack(tagged, geobox, chunk=128)
    naive = naive_composite(ds, obs).compute(scheduler="threads")
    for b in REFLECTANCE_BANDS:
        assert np.allclose(data[BAND[b]], naive[b].values, equal_nan=True, atol=1e-6), b

    count = data[BAND[COUNT_BAND]]
    assert count.max() <= res.observations == len(items)
    inside = aoi_mask(region.geometry, geobox)
    assert 0.9 < inside.mean() < 1.0, "the grid is the AOI snapped outward"
    assert res.valid_fraction == pytest.approx((count[inside] > 0).mean(), abs=1e-9)
    assert res.valid_fraction > 0.9 and not res.empty and res.skipped == []
    assert sum(res.clear_count_histogram.values()) == inside.sum()

    # Mining (truth 1) is bare and wet; forest around it is green.
    with rasterio.open(small_world / "truth" / "2021.tif") as t:
        truth = np.empty(geobox.shape.yx, np.uint8)
        rasterio.warp.reproject(
            t.read(1), truth, src_transform=t.transform, src_crs=t.crs,
            dst_transform=geobox.affine, dst_crs=t.crs, resampling=rasterio.enums.Resampling.nearest,
        )  # fmt: skip
    ndvi = data[BAND["NDVI"]]
    mining, other = ndvi[truth == 1], ndvi[truth == 0]
    assert np.nanmedian(mining) < 0.35 < 0.6 < np.nanmedian(other)
    assert np.nanmedian(data[BAND["BSI"]][truth == 1]) > np.nanmedian(data[BAND["BSI"]][truth == 0])


@pytest.mark.skipif(shutil.which("gdal_translate") is None, reason="Debian's gdal_translate (gdal-bin) is not installed; make test installs it")  # fmt: skip
def test_debian_gdal_reads_the_composite_to_the_bit(
    small_scenes_root: Path, small_world: Path, tmp_path: Path
) -> None:
    """The composite is ZSTD with the floating-point predictor: Debian's GDAL 3.6 (as
    QGIS on Debian uses) decodes it, full resolution and overviews, to the same bits."""
    import subprocess

    region = small_region()
    items = read_scene_items(scenes_path(small_scenes_root, region.id, "2021"))
    out = build_composite(items, region_geobox(region), tmp_path / "c.tif", chunk=128).path
    with rasterio.open(out) as src:
        assert src.profile["compress"] == "zstd"
        assert src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "3", src.tags(ns="IMAGE_STRUCTURE")  # fmt: skip
        levels = len(src.overviews(1))
    assert levels, "the composite has overviews"
    for level in (None, levels - 1):
        plain = tmp_path / f"plain{level}.tif"
        ovr = [] if level is None else ["-ovr", str(level)]
        cmd = ["gdal_translate", "-q", *ovr, "-co", "COMPRESS=NONE", str(out), str(plain)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        with rasterio.open(plain) as debian, rasterio.open(out, overview_level=level) as src:
            theirs, ours = debian.read(), src.read()
        assert theirs.shape == ours.shape and np.isfinite(ours).any()
        np.testing.assert_array_equal(theirs.view(np.uint32), ours.view(np.uint32))


def test_cloudy_pixels_never_reach_the_median(small_scenes_root: Path, tmp_path: Path) -> None:
    """Where exactly one observation is clear, the composite equals that observation."""
    region = small_region()
    items = read_scene_items(scenes_path(small_scenes_root, region.id, "2020"))
    geobox = region_geobox(region)
    tagged, obs = plan_observations(items, lon=-70.54)
    ds = load_stack(tagged, geobox, chunk=256).compute(scheduler="threads")
    res = build_composite(items, geobox, tmp_path / "c.tif", chunk=256)
    data, _ = _read(res.path)
    clear = ~np.isin(ds["scl"].values, MASKED_SCL)
    only = clear.sum(0) == 1
    assert only.sum() > 100, "the world has pixels with a single clear look"
    t_idx = clear.argmax(0)
    for b in ("B04", "B11"):
        role = {"B04": "red", "B11": "swir16"}[b]
        dn = np.take_along_axis(ds[role].values, t_idx[None], 0)[0].astype(np.float64)
        off = np.array([o.offset[b] for o in obs])[t_idx]
        expect = dn * 1e-4 + off
        got = data[BAND[b]]
        ok = only & (dn > 0)
        assert np.allclose(got[ok], expect[ok], atol=1e-6)
    assert (data[BAND[COUNT_BAND]] == clear.sum(0)).all()


def test_missing_and_corrupt_cogs_are_skipped_and_named(
    small_scenes_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    region = small_region()
    items = read_scene_items(scenes_path(small_scenes_root, region.id, "2019"))
    assert len(items) >= 3
    # Work on copies: the world is shared by other tests.
    copies = []
    for item in items:
        item = json.loads(json.dumps(item))
        for asset in item["assets"].values():
            src = Path(asset["href"].removeprefix("file://"))
            dst = tmp_path / "cogs" / item["id"] / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            asset["href"] = dst.as_uri()
        copies.append(item)
    missing, corrupt = copies[0], copies[1]
    Path(missing["assets"]["red"]["href"].removeprefix("file://")).unlink()
    broken = Path(corrupt["assets"]["swir16"]["href"].removeprefix("file://"))
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # truncated

    messages: list[str] = []
    with caplog.at_level(logging.INFO):
        res = build_composite(
            copies, region_geobox(region), tmp_path / "c.tif", chunk=256, progress=messages.append
        )
    skipped = {s.id: s.reason for s in res.skipped}
    assert set(skipped) == {missing["id"], corrupt["id"]}
    assert "red:" in skipped[missing["id"]] and "B04.tif" in skipped[missing["id"]]
    assert "swir16:" in skipped[corrupt["id"]]
    assert any(missing["id"] in m and "skipping" in m for m in messages)
    assert res.scenes_used == [c["id"] for c in copies[2:]]
    assert res.path.exists() and not res.empty and res.valid_fraction > 0.5
    data, prof = _read(res.path)
    assert prof["tags"]["asmwatch_skipped"] == f"{missing['id']},{corrupt['id']}"
    assert data[BAND[COUNT_BAND]].max() == len(copies) - 2


def test_no_scenes_gives_an_empty_composite(tmp_path: Path) -> None:
    region = small_region()
    res = composite_for_region(region, region.period("2020"), tmp_path, chunk=256)
    assert res.empty and res.valid_fraction == 0.0 and res.observations == 0
    data, prof = _read(res.path)
    assert res.path == tmp_path / "composite" / region.id / "2020.tif"
    assert prof["tags"]["asmwatch_empty"] == "true"
    assert np.isnan(data[BAND["B04"]]).all() and (data[BAND[COUNT_BAND]] == 0).all()


def test_failed_write_keeps_the_previous_composite(small_scenes_root: Path, tmp_path: Path) -> None:
    region = small_region()
    items = read_scene_items(scenes_path(small_scenes_root, region.id, "2021"))
    target = tmp_path / "c.tif"
    good = build_composite(items, region_geobox(region), target, chunk=256)
    before = target.read_bytes()
    with pytest.raises(CompositeError, match="chunk must be at least 64"):
        build_composite(items, region_geobox(region), target, chunk=8)

    class Boom(RuntimeError):
        pass

    def explode(msg: str) -> None:
        if "blocks written" in msg:
            raise Boom(msg)

    with pytest.raises(Boom):
        build_composite(items, region_geobox(region), target, chunk=128, progress=explode)
    assert target.read_bytes() == before and good.size_bytes == len(before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left"
    again = build_composite(items, region_geobox(region), target, chunk=256)
    assert again.path.read_bytes() == before, "re-running gives the same file"


def test_region_across_two_utm_zones_gets_one_grid(tmp_path: Path) -> None:
    """Two scenes in zones 18 and 19 (two MGRS tiles) land on one grid in one composite."""
    import dataclasses

    from pyproj import Transformer

    region = dataclasses.replace(
        small_region(), id="two-zones", bbox=(-72.02, -13.0, -71.98, -12.97),
        geometry={"type": "Polygon", "coordinates": [[[-72.02, -13.0], [-71.98, -13.0],
                  [-71.98, -12.97], [-72.02, -12.97], [-72.02, -13.0]]]},
    )  # fmt: skip

    def utm_bounds(epsg: int, w: float, e: float) -> tuple[float, float, float, float]:
        t = Transformer.from_crs(4326, epsg, always_xy=True)
        xs, ys = t.transform([w, w, e, e], [-13.01, -12.96, -13.01, -12.96])
        return (min(xs) // 20 * 20, min(ys) // 20 * 20, max(xs) // 20 * 20 + 20, max(ys) // 20 * 20 + 20)  # fmt: skip

    west = constant_scene(tmp_path, "S2A_18LZL_20210701_0_L2A", "2021-07-01T15:00:00Z", 32718,
                          utm_bounds(32718, -72.03, -71.995), dn=1500)  # fmt: skip
    east = constant_scene(tmp_path, "S2A_19LBF_20210706_0_L2A", "2021-07-06T15:00:00Z", 32719,
                          utm_bounds(32719, -72.005, -71.97), dn=2500)  # fmt: skip
    geobox = region_geobox(region)
    assert geobox.crs.epsg == 32719  # the zone of the AOI centre (-72.0 is zone 19's edge)
    res = build_composite([west, east], geobox, tmp_path / "c.tif", aoi=region.geometry, chunk=128)
    data, prof = _read(res.path)
    red = data[BAND["B04"]]
    assert prof["crs"].to_epsg() == 32719 and res.observations == 2
    assert res.valid_fraction == pytest.approx(1.0)
    # West only from zone 18, east only from zone 19, the overlap is their median.
    assert np.nanmax(np.abs(red[:, :5] - 0.15)) < 1e-6
    assert np.nanmax(np.abs(red[:, -5:] - 0.25)) < 1e-6
    mid = red[:, red.shape[1] // 2]
    assert np.allclose(mid, 0.20, atol=1e-6)
    assert set(np.unique(data[BAND[COUNT_BAND]])) == {1.0, 2.0}


def region_geobox_for(item: dict[str, Any]) -> Any:
    """A 10 m GeoBox over the middle of an item's footprint (5 km square)."""
    import dataclasses

    w, s, e, n = item["bbox"]
    cx, cy = (w + e) / 2, (s + n) / 2
    bbox = (cx - 0.02, cy - 0.02, cx + 0.02, cy + 0.02)
    return region_geobox(dataclasses.replace(small_region(), bbox=bbox))


def _file_on(geobox: Any, name: str) -> np.ndarray:
    d = shared("raster/earthsearch_S2A_29RKH_20200219_0_L2A_decimated")
    with rasterio.open(d / name) as src:
        win = rasterio.windows.from_bounds(*geobox.boundingbox, transform=src.transform)
        return src.read(1, window=win.round_offsets().round_lengths())


@pytest.mark.parametrize("resolution", [100.0, 200.0])
def test_real_earth_search_tile_composites_to_scaled_dn_where_clear(
    resolution: float, tmp_path: Path
) -> None:
    items, geobox = real_tile_items(resolution)
    res = build_composite(items, geobox, tmp_path / "c.tif", chunk=128)
    data, _ = _read(res.path)
    scl = _file_on(geobox, "SCL.tif")
    if resolution == 100.0:
        scl = scl.repeat(2, 0).repeat(2, 1)  # nearest upsampling of the 200 m SCL
        native = ("B02", "B03", "B04", "B08")  # the 100 m files at their own grid
    else:
        native = ("B11", "B12")
    cloud = np.isin(scl, (8, 9, 10))
    assert cloud.mean() > 0.1 and (~cloud).mean() > 0.5, "the window holds both"
    for b in native:
        dn = _file_on(geobox, f"{b}.tif").astype(np.float64)
        got = data[BAND[b]]
        clear = ~np.isin(scl, MASKED_SCL) & (dn > 0)
        # Baseline 02.14: offset 0, so reflectance = DN x 1e-4.
        assert np.allclose(got[clear], dn[clear] * 1e-4 + 0.0, rtol=0, atol=1e-6), b
        assert np.isnan(got[cloud]).all(), b
    assert (data[BAND[COUNT_BAND]] == (~np.isin(scl, MASKED_SCL)).astype(np.float32)).all()
    assert res.valid_fraction == pytest.approx(float((~cloud).mean()), abs=1e-6)


def test_real_search_results_make_composite_plans() -> None:
    """The PC 35MNM collection and the Earth Search 2020 search give the right stacks."""
    import glob

    import odc.stac
    import pystac

    from pipelines.stages.stac.normalize import normalize_items
    from tests.conftest import load_json

    pc = load_json(
        "stac/planetary-computer/itemcollection_35MNM_2020-06-01_to_07-31_13items.geojson"
    )
    scenes = normalize_items(pc["features"]).scenes
    items = [s.to_item() for s in scenes]
    tagged, obs = plan_observations(items, lon=27.0)
    assert len(obs) == 13 and len({o.date for o in obs}) == 13
    assert [o.scene_ids[0] for o in obs] == [s.id for s in sorted(scenes, key=lambda s: s.datetime)]
    # Baseline 02.12/02.13 in 2020: no offset; odc-stac reads every band we need.
    assert {o.offset["B04"] for o in obs} == {0.0} and {o.scale["B11"] for o in obs} == {1e-4}
    parsed = list(odc.stac.parse_items([pystac.Item.from_dict(i) for i in tagged]))
    for p in parsed:
        assert {("red", 1), ("swir16", 1), ("scl", 1)} <= set(p.bands)
        red, scl = p.bands[("red", 1)], p.bands[("scl", 1)]
        assert scl.meta is not None and scl.meta.nodata == 0
        assert red.geobox is not None and red.geobox.crs.epsg == 32735
        assert red.geobox.resolution.x == 10 and scl.geobox.resolution.x == 20

    # Lazily loadable from the real (remote) hrefs: no pixel is read here, and the GDAL
    # settings for range reads travel with the graph to the workers.
    from odc.loader._rio import capture_rio_env

    ds = load_stack(tagged[:2], region_geobox_for(tagged[0]), chunk=512)
    assert ds.sizes["time"] == 2 and ds["red"].dtype == np.uint16 and ds["scl"].dtype == np.uint8
    assert capture_rio_env().get("GDAL_DISABLE_READDIR_ON_OPEN") == "EMPTY_DIR"

    raw: list[dict[str, Any]] = []
    for f in sorted(
        glob.glob(str(shared("stac/earth-search-v1")) + "/search-post_bbox-9-47-10-48_*page*.json")
    ):
        raw += json.loads(Path(f).read_text())["features"]
    kept = normalize_items(raw).scenes
    assert len(kept) == 8
    tagged, obs = plan_observations([s.to_item() for s in kept], lon=9.5)
    # Tiles of the same pass fuse into one observation; every scene is in exactly one.
    assert sorted(i for o in obs for i in o.scene_ids) == sorted(s.id for s in kept)
    assert len(obs) == len({s.datetime.date() for s in kept})
    # Reprocessed (_1_, baseline 05.00) scenes carry the -0.1 offset even in 2020.
    assert {o.offset["B04"] for o in obs} == {-0.1}


def test_chunks_shrink_to_fit_worker_memory() -> None:
    from pipelines.stages.composite import safe_chunk, task_bytes

    gib = 2**30
    # 20 observations fit 1024 px blocks in 4 GiB workers (the full-tile bench case).
    assert task_bytes(1024, 20) < 1 * gib
    assert safe_chunk(1024, 20, 4 * gib) == 1024
    # A year of two overlapping tiles (140 observations) does not: blocks halve.
    assert task_bytes(1024, 140) > 2 * gib
    fitted = safe_chunk(1024, 140, 4 * gib)
    assert fitted == 512 and task_bytes(fitted, 140) <= 2 * gib
    # More threads per worker share its memory; unknown memory leaves the request alone.
    assert safe_chunk(1024, 140, 4 * gib, threads=4) == 256
    assert safe_chunk(1024, 140, None) == 1024
    assert safe_chunk(1024, 5000, 1 * gib) == 128, "never below 128 px"


@pytest.mark.parametrize("processes", [False, True])
def test_a_corrupt_block_inside_a_cog_is_reported_not_fatal(
    small_scenes_root: Path, tmp_path: Path, processes: bool
) -> None:
    """A damaged tile deep inside a file passes the scene check; the read failure is
    logged (forwarded from worker processes too), that block is nodata for that scene,
    and the composite lands."""
    from distributed import Client, LocalCluster

    region = small_region()
    items = [json.loads(json.dumps(i)) for i in read_scene_items(scenes_path(small_scenes_root, region.id, "2021"))]  # fmt: skip
    red = items[0]["assets"]["red"]
    src = Path(red["href"].removeprefix("file://"))
    dst = tmp_path / "B04.tif"
    shutil.copy(src, dst)
    with rasterio.open(dst) as r:
        offset = int(r.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    raw = bytearray(dst.read_bytes())
    raw[offset : offset + 64] = b"\xff" * 64  # the first full-resolution tile's deflate stream
    dst.write_bytes(bytes(raw))
    red["href"] = dst.as_uri()

    kw: dict[str, Any] = {"n_workers": 1, "threads_per_worker": 1, "processes": processes,
                          "dashboard_address": None}  # fmt: skip
    if processes:
        kw["host"] = "127.0.0.1"
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        res = build_composite(items, region_geobox(region), tmp_path / "c.tif", chunk=128, client=client)  # fmt: skip
    assert res.skipped == [], "the file opens and its last block reads"
    assert res.read_failures and all("B04.tif" in m for m in res.read_failures)
    assert res.path.exists() and res.valid_fraction > 0.5


def test_data_root_with_space_and_plus_reads(tmp_path: Path) -> None:
    """file:// hrefs are percent-encoded ('+' is %2B); the composite reads them anyway."""
    import dataclasses

    from pyproj import Transformer

    region = dataclasses.replace(small_region(), bbox=(-70.55, -13.0, -70.54, -12.99),
                                 geometry={"type": "Polygon", "coordinates": [[[-70.55, -13.0], [-70.54, -13.0], [-70.54, -12.99], [-70.55, -12.99], [-70.55, -13.0]]]})  # fmt: skip
    t = Transformer.from_crs(4326, 32719, always_xy=True)
    xs, ys = t.transform([-70.56, -70.53], [-13.01, -12.98])
    bounds = (min(xs) // 20 * 20, min(ys) // 20 * 20, max(xs) // 20 * 20, max(ys) // 20 * 20)
    odd = tmp_path / "my data+v2"
    item = constant_scene(odd, "S2A_19LCF_20210701_0_L2A", "2021-07-01T14:56:00Z", 32719, bounds, dn=1234)  # fmt: skip
    assert "%2B" in item["assets"]["red"]["href"] and "%20" in item["assets"]["red"]["href"]
    res = build_composite([item], region_geobox(region), odd / "c.tif", chunk=128)
    data, _ = _read(res.path)
    assert res.skipped == [] and res.read_failures == []
    assert np.allclose(data[BAND["B04"]], 0.1234, atol=1e-6)
