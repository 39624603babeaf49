"""The composite's own block reader against odc-loader's (GDAL's warp), pixel for pixel:
files at the grid's resolution, twice and six times coarser, on and off the grid, with
nodata holes, on blocks across the files' edges; and the whole stage at two block sizes
(issue 20)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from odc.geo.geobox import GeoBox
from odc.loader._rio import rio_read
from odc.loader.types import RasterBandMetadata, RasterLoadParams, RasterSource
from rasterio.transform import from_origin

from pipelines.stages.composite import plan_observations, read_scene_items, region_geobox
from pipelines.stages.composite.read import _FILES, _on_grid, plan_stack, read_onto

X0, Y0 = 300_000.0, 9_000_000.0


def _cog(path: Path, res: float, shape: tuple[int, int], x0: float, y0: float, dtype: str, seed: int, nodata: int = 0) -> Path:  # fmt: skip
    rng = np.random.default_rng(seed)
    hi = 250 if dtype == "uint8" else 12000
    data = rng.integers(1, hi, size=shape).astype(dtype)
    # nodata holes: blobs, single pixels and a stripe
    data[5:9, 3:11] = nodata
    data[rng.random(shape) < 0.03] = nodata
    data[:, shape[1] // 2] = nodata
    profile = {
        "driver": "GTiff", "width": shape[1], "height": shape[0], "count": 1, "dtype": dtype,
        "crs": "EPSG:32719", "transform": from_origin(x0, y0, res, res), "nodata": nodata,
        "tiled": True, "blockxsize": 64, "blockysize": 64, "compress": "deflate",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def _ours_and_theirs(
    src: RasterSource, cfg: RasterLoadParams, gb: GeoBox, dtype: str, token: str, seams: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """The file on block ``gb`` by our reader and by odc-loader's (pasted as its fuser
    does); no read failures either way."""
    ours = np.zeros(gb.shape.yx, dtype)
    failures: list[str] = []
    read_onto(src, cfg, gb, ours, failures, token=token, seams=seams)
    assert failures == []
    theirs = np.zeros(gb.shape.yx, dtype)
    roi, pix = rio_read(src, cfg, gb)
    if pix.size:
        np.copyto(theirs[roi], pix, where=theirs[roi] == 0)
    return ours, theirs


def _blocks(rng: np.random.Generator, n: int) -> list[GeoBox]:
    """Blocks of the 10 m grid in all sorts of places: inside, across each edge of the
    files, beyond them, one pixel wide; odd and even offsets."""
    out = []
    for _ in range(n):
        h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        r, c = int(rng.integers(-60, 140)), int(rng.integers(-60, 140))
        out.append(GeoBox((h, w), from_origin(X0 + c * 10, Y0 - r * 10, 10, 10), "EPSG:32719"))
    return out


@pytest.mark.parametrize(
    ("res", "dtype", "resampling", "offset_px"),
    [
        (10.0, "uint16", "bilinear", (0, 0)),  # pasted
        (20.0, "uint16", "bilinear", (0, 0)),  # B11, B12: the exact 2x kernel
        (20.0, "uint16", "bilinear", (3, 5)),  # ... with the file's corner at odd pixels
        (20.0, "uint8", "nearest", (1, 2)),  # SCL
        (60.0, "uint16", "nearest", (0, 3)),  # L1C 60 m bands for s2cloudless
        (60.0, "uint16", "bilinear", (0, 0)),  # not ours: odc-loader reads it
        (20.0, "uint16", "bilinear", (0.5, 0)),  # off the grid: odc-loader reads it
    ],
)
def test_block_reads_equal_odc_loaders_pixel_for_pixel(
    tmp_path: Path,
    res: float,
    dtype: str,
    resampling: str,
    offset_px: tuple[float, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = int(1000 // res)
    path = _cog(tmp_path / "b.tif", res, (rows, rows + 3), X0 + offset_px[1] * 10, Y0 - offset_px[0] * 10, dtype, seed=int(res))  # fmt: skip
    src = RasterSource(str(path), meta=RasterBandMetadata(dtype, 0))
    cfg = RasterLoadParams(dtype=dtype, fill_value=0, resampling=resampling, fail_on_error=False)
    ours_path = isinstance(offset_px[0], int) and not (res == 60.0 and resampling == "bilinear")
    delegated: list[str] = []
    monkeypatch.setattr("odc.loader._rio.rio_read", lambda *a, **k: delegated.append("x") or rio_read(*a, **k))  # fmt: skip
    rng = np.random.default_rng(7)
    differ = 0
    for gb in _blocks(rng, 60):
        ours, theirs = _ours_and_theirs(src, cfg, gb, dtype, "t")
        differ += int((ours != theirs).sum())
        with rasterio.open(path) as ds:
            assert (_on_grid(ds, gb) is not None) == isinstance(offset_px[0], int)
    assert differ == 0
    assert (delegated == []) == ours_path, "our reader for files on the grid, odc-loader's else"
    _FILES.clear()


def test_a_rewritten_file_is_read_again_in_the_next_run(tmp_path: Path) -> None:
    """Files stay open within a run (token) and are reopened in the next: a composite
    rebuilt after a scene file was replaced sees the new file."""
    path = _cog(tmp_path / "b.tif", 10.0, (50, 50), X0, Y0, "uint16", seed=1)
    src = RasterSource(str(path), meta=RasterBandMetadata("uint16", 0))
    cfg = RasterLoadParams(dtype="uint16", fill_value=0, resampling="bilinear", fail_on_error=False)  # fmt: skip
    gb = GeoBox((50, 50), from_origin(X0, Y0, 10, 10), "EPSG:32719")
    first = np.zeros((50, 50), np.uint16)
    read_onto(src, cfg, gb, first, [], token="run-1")
    path.unlink()
    _cog(path, 10.0, (50, 50), X0, Y0, "uint16", seed=2)
    again = np.zeros((50, 50), np.uint16)
    read_onto(src, cfg, gb, again, [], token="run-2")
    with rasterio.open(path) as ds:
        assert (again == ds.read(1)).all() and (again != first).any()
    _FILES.clear()


def _read_one(path: Path, size: int) -> tuple[list[str], np.ndarray]:
    """``read_onto`` of a uint16 file onto a ``size`` px block at the grid's corner (the
    stage's settings: odc-loader's reader raises): (failures, block)."""
    src = RasterSource(str(path), meta=RasterBandMetadata("uint16", 0))
    cfg = RasterLoadParams(dtype="uint16", fill_value=0, resampling="bilinear", fail_on_error=True)  # fmt: skip
    gb = GeoBox((size, size), from_origin(X0, Y0, 10, 10), "EPSG:32719")
    dst = np.zeros((size, size), np.uint16)
    failures: list[str] = []
    read_onto(src, cfg, gb, dst, failures, token=path.name)
    _FILES.clear()
    return failures, dst


@pytest.mark.parametrize("offset_px", [0, 0.5], ids=["our reader", "odc-loader's reader"])
def test_a_damaged_tile_is_a_failure_message_and_nodata_on_either_path(
    tmp_path: Path, offset_px: float
) -> None:
    path = _cog(tmp_path / "b.tif", 20.0, (50, 53), X0 + offset_px * 10, Y0, "uint16", seed=3)
    with rasterio.open(path) as ds:
        at = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    raw = bytearray(path.read_bytes())
    raw[at : at + 64] = b"\xff" * 64  # the first tile's deflate stream
    path.write_bytes(bytes(raw))
    failures, dst = _read_one(path, 40)
    assert len(failures) == 1 and "b.tif" in failures[0] and not dst.any(), failures


def test_an_unreadable_file_is_a_failure_message_and_nodata(tmp_path: Path) -> None:
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00 not a tiff")
    failures, dst = _read_one(path, 8)
    assert len(failures) == 1 and "broken.tif" in failures[0] and not dst.any()


def test_block_edges_and_small_regions() -> None:
    from pipelines.stages.composite.read import block_edges
    from pipelines.stages.composite.write import split_chunk

    assert block_edges(3000, 1024) == (0, 1024, 2048, 3000)
    assert block_edges(3000, 1024, offset=236) == (0, 236, 1260, 2284, 3000)
    assert block_edges(3000, 1024, offset=1024 + 236) == (0, 236, 1260, 2284, 3000)
    assert block_edges(100, 1024, offset=236) == (0, 100)
    assert split_chunk(1024, (966, 888), lanes=2) == 512  # 4 blocks for 2 threads
    assert split_chunk(1024, (10980, 10980), lanes=2) == 1024
    assert split_chunk(1024, (300, 300), lanes=8) == 256, "never below 256 px"


def _small_world_items(root: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The small region and its stored 2021 scenes."""
    from pipelines.infra.layout import scenes_path
    from tests.conftest import small_region

    region = small_region()
    return region, read_scene_items(scenes_path(root, region.id, "2021"))


def test_the_stage_equals_odc_stacs_stack_whatever_the_blocks(
    small_scenes_root: Path, tmp_path: Path
) -> None:
    """The whole composite, every band, equals the median of odc-stac's own lazy stack
    (the stage before issue 20) to the bit, at 128 px blocks and at 1024 px blocks split
    for idle threads; its block edges lie on the scenes' internal tiles."""
    from pipelines.stages.composite import build_composite, composite_array, load_stack

    region, items = _small_world_items(small_scenes_root)
    geobox = region_geobox(region)
    lon = geobox.extent.to_crs("EPSG:4326").centroid.coords[0][0]
    tagged, obs = plan_observations(items, lon)
    before = composite_array(load_stack(tagged, geobox, chunk=256), obs).compute(scheduler="threads")  # fmt: skip
    plan = plan_stack(tagged, obs, geobox, chunk=128)
    with rasterio.open(tagged[0]["assets"]["blue"]["href"].removeprefix("file://")) as f:
        th, tw = f.block_shapes[0]
        row0 = round((f.transform.f - geobox.affine.f) / 10)  # the file's row of grid row 0
        col0 = round((geobox.affine.c - f.transform.c) / 10)
    assert (row0, col0) == (20, 20), "the small world's grid starts inside the scenes' tiles"
    assert (plan.rows[1] + row0) % min(th, 128) == 0 and (plan.cols[1] + col0) % min(tw, 128) == 0  # fmt: skip
    logs: list[str] = []
    for chunk in (128, 1024):
        res = build_composite(items, geobox, tmp_path / f"{chunk}.tif", chunk=chunk, progress=logs.append)  # fmt: skip
        with rasterio.open(res.path) as src:
            np.testing.assert_array_equal(src.read(), before)
    assert any("would leave some of the" in m and "blocks of up to 256 px" in m for m in logs), logs


def test_overviews_are_the_composites_averages_whether_blocks_bring_level_1_or_not(
    small_scenes_root: Path, tmp_path: Path
) -> None:
    """On a grid whose blocks start on even pixels the block tasks bring overview level 1
    and the stage is not read back for it; on a grid one pixel off they cannot (their
    2 x 2 cells straddle blocks) and the levels are halved from the stage. Either way
    every level equals the 2 x 2 NaN-mean of the one above, to the bit."""
    from pipelines.infra.tiling import overview_levels, reduce_average
    from pipelines.stages.composite import build_composite

    region, items = _small_world_items(small_scenes_root)
    for name, geobox, halves in (
        ("even", region_geobox(region), True),
        ("odd", region_geobox(region)[1:, 1:], False),
    ):
        lon = geobox.extent.to_crs("EPSG:4326").centroid.coords[0][0]
        tagged, obs = plan_observations(items, lon)
        assert plan_stack(tagged, obs, geobox, chunk=128).halves is halves, name
        logs: list[str] = []
        res = build_composite(items, geobox, tmp_path / f"{name}.tif", chunk=128, progress=logs.append)  # fmt: skip
        assert any("overview level 1 came with the blocks" in m for m in logs) is halves, logs
        with rasterio.open(res.path) as src:
            level = src.read()
            n = len(src.overviews(1))
        assert n == overview_levels(*geobox.shape.yx) >= 1
        for k in range(n):
            level = reduce_average(level)
            with rasterio.open(res.path, overview_level=k) as ovr:
                np.testing.assert_array_equal(ovr.read(), level, err_msg=f"{name}: level {k + 1}")  # fmt: skip


class _Recorder:
    """A dataset stand-in that serves windows of an array and records them."""

    name = "recorder.tif"

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.windows = data, []

    def read(self, band: int, window: Any) -> np.ndarray:
        self.windows.append(window)
        r, c = int(window.row_off), int(window.col_off)
        return self.data[r : r + int(window.height), c : c + int(window.width)].copy()


def test_a_bilinear_window_past_a_tile_seam_takes_those_lines_from_the_seams() -> None:
    """A window one line past its tiles on each side reads only its own tiles from the
    file and the four lines beyond from the seams, with the same pixels; a window
    inside one tile, or seams that do not cover it, read the file alone."""
    from pipelines.stages.composite.read import Seams, _read_seamed, _seam_lines

    data = np.random.default_rng(0).integers(1, 9999, (300, 260)).astype(np.uint16)
    assert _seam_lines(0, 300, 64) == [63, 64, 127, 128, 191, 192, 255, 256]
    assert _seam_lines(64, 128, 64) == [], "a span of one tile has no seam inside it"
    rows = {r: data[r, 10:250] for r in _seam_lines(0, 300, 64)}
    cols = {c: data[:, c] for c in _seam_lines(10, 250, 64)}
    seams = Seams((64, 64), rows, cols, (0, 300, 10, 250))
    for (r0, r1, c0, c1), read in [
        ((63, 129, 127, 193), (64, 128, 128, 192)),  # a line past on every side
        ((63, 100, 130, 193), (64, 100, 130, 192)),  # past the top and the right
        ((70, 100, 130, 150), (70, 100, 130, 150)),  # inside one tile
        ((63, 64, 127, 129), (63, 64, 128, 128 + 1)),  # one row: read, not all seams
    ]:
        ds = _Recorder(data)
        out = np.zeros((r1 - r0, c1 - c0), np.uint16)
        _read_seamed(ds, seams, r0, r1, c0, c1, out)
        np.testing.assert_array_equal(out, data[r0:r1, c0:c1])
        [w] = ds.windows
        got = (int(w.row_off), int(w.row_off + w.height), int(w.col_off), int(w.col_off + w.width))  # fmt: skip
        assert got == read, (r0, r1, c0, c1)
    ds = _Recorder(data)
    out = np.zeros((66, 66), np.uint16)
    _read_seamed(ds, seams, 63, 129, 5, 71, out)  # column 5 is outside the seams' span
    np.testing.assert_array_equal(out, data[63:129, 5:71])
    assert [(int(w.height), int(w.width)) for w in ds.windows] == [(66, 66)]


@pytest.mark.parametrize("offset_px", [(0, 0), (3, 5)], ids=["corner on the grid", "odd corner"])
def test_reads_with_tile_seams_equal_odc_loaders(
    tmp_path: Path, offset_px: tuple[int, int]
) -> None:
    """A 20 m file of many 64 px tiles read bilinearly onto blocks with its seams
    (``read_seams``, as the stage does before its blocks) gives odc-loader's pixels, on
    blocks on the tiles' grid and anywhere else."""
    from pipelines.stages.composite.read import read_seams

    path = _cog(tmp_path / "b.tif", 20.0, (150, 163), X0 + offset_px[1] * 10, Y0 - offset_px[0] * 10, "uint16", seed=5)  # fmt: skip
    region = GeoBox((300, 320), from_origin(X0, Y0, 10, 10), "EPSG:32719")
    seams = read_seams(str(path), region, "t", {})
    assert seams is not None and seams.tile == (64, 64)
    assert sorted(seams.rows) == [63, 64, 127, 128] and sorted(seams.cols) == [63, 64, 127, 128]
    src = RasterSource(str(path), meta=RasterBandMetadata("uint16", 0))
    cfg = RasterLoadParams(dtype="uint16", fill_value=0, resampling="bilinear", fail_on_error=False)  # fmt: skip
    on_tiles = [region[r : r + 128, c : c + 128] for r in range(0, 300, 128) for c in range(0, 320, 128)]  # fmt: skip
    elsewhere = [g for g in _blocks(np.random.default_rng(3), 40) if min(Y0 - g.affine.f, g.affine.c - X0) >= 0]  # fmt: skip
    for gb in on_tiles + elsewhere:
        ours, theirs = _ours_and_theirs(src, cfg, gb, "uint16", "t", seams)
        np.testing.assert_array_equal(ours, theirs)
    _FILES.clear()
    assert read_seams(str(tmp_path / "missing.tif"), region, "t", {}) is None


def _tiled_scene(folder: Path, i: int) -> dict[str, Any]:
    """A hand-made L2A scene of 64 px tiles (its 20 m files several tiles across) as the
    scenes stage's item."""
    import datetime as dt

    from pipelines.stages.stac.normalize import ROLE_RESOLUTION

    assets = {}
    for role, res in ROLE_RESOLUTION.items():
        n = 2000 // int(res)
        dtype = "uint8" if role == "scl" else "uint16"
        path = _cog(folder / f"s{i}_{role}.tif", res, (n, n + 1), X0, Y0, dtype, seed=10 * i + len(role))  # fmt: skip
        if role == "scl":  # SCL classes: vegetation, with some cloud
            with rasterio.open(path, "r+") as f:
                d = f.read(1)
                f.write(np.where(d == 0, 0, np.where(d % 5 == 0, 9, 4)).astype("uint8"), 1)
        band: dict[str, Any] = {"nodata": 0, "data_type": dtype}
        if role != "scl":
            band |= {"scale": 1e-4, "offset": -0.1}
        assets[role] = {
            "href": path.as_uri(), "roles": ["data"], "raster:bands": [band],
            "proj:shape": [n, n + 1], "proj:transform": [res, 0, X0, 0, -res, Y0],
        }  # fmt: skip
    when = dt.datetime(2021, 6, 1, 14, 50) + dt.timedelta(days=5 * i)
    foot = GeoBox((200, 201), from_origin(X0, Y0, 10, 10), "EPSG:32719").extent.to_crs("EPSG:4326")  # fmt: skip
    return {
        "type": "Feature", "stac_version": "1.0.0", "stac_extensions": [],
        "id": f"S2A_19LCF_{when:%Y%m%d}_0_L2A", "collection": "sentinel-2-l2a",
        "geometry": foot.json, "bbox": list(foot.boundingbox),
        "properties": {"datetime": when.isoformat() + "Z", "proj:epsg": 32719},
        "links": [], "assets": assets,
    }  # fmt: skip


def test_the_stage_with_tile_seams_equals_odc_stacs_stack(tmp_path: Path) -> None:
    """Scenes whose 20 m files are many tiles across: the stage reads their seams first
    (and says so), and its composite still equals the median of odc-stac's own stack."""
    from pipelines.stages.composite import build_composite, composite_array, load_stack

    items = [_tiled_scene(tmp_path, i) for i in range(3)]
    geobox = GeoBox((190, 196), from_origin(X0 + 40, Y0 - 20, 10, 10), "EPSG:32719")
    lon = geobox.extent.to_crs("EPSG:4326").centroid.coords[0][0]
    tagged, obs = plan_observations(items, lon)
    before = composite_array(load_stack(tagged, geobox, chunk=256), obs).compute(scheduler="threads")  # fmt: skip
    logs: list[str] = []
    res = build_composite(items, geobox, tmp_path / "c.tif", chunk=64, progress=logs.append)
    assert any("tile seams of 6 files" in m for m in logs), logs
    with rasterio.open(res.path) as src:
        np.testing.assert_array_equal(src.read(), before)
    assert np.isfinite(before[0]).mean() > 0.9, "the scenes cover the region"


def test_a_group_of_blocks_equals_its_blocks_one_by_one(tmp_path: Path) -> None:
    """Blocks in groups of 2 x 2 (a thin first row and column of blocks alone, where the
    scenes' tiles start) decode the coarser files' windows once for the group, and give
    each block's composite and overview level 1 to the bit; too few groups for the worker
    threads and every block is its own task."""
    from pipelines.stages.composite.read import (
        _prefetch,
        block_groups,
        composite_group,
        composite_task,
        with_seams,
    )

    items = [_tiled_scene(tmp_path, i) for i in range(3)]
    geobox = GeoBox((190, 196), from_origin(X0 + 40, Y0 - 20, 10, 10), "EPSG:32719")
    tagged, obs = plan_observations(items, geobox.extent.to_crs("EPSG:4326").centroid.coords[0][0])  # fmt: skip
    plan = with_seams(plan_stack(tagged, obs, geobox, chunk=64), None, lambda _m: None)
    assert plan.rows == (0, 62, 126, 190) and plan.cols == (0, 60, 124, 188, 196)
    groups = block_groups(plan, lanes=1)
    assert groups == [((0, 0),), ((0, 1), (0, 2)), ((0, 3),), ((1, 0), (2, 0)), ((1, 1), (1, 2), (2, 1), (2, 2)), ((1, 3), (2, 3))]  # fmt: skip
    assert block_groups(plan, lanes=4) == [(b,) for b in plan.blocks]
    fetched = _prefetch(plan, groups[4])
    assert sorted(Path(n).name for n in fetched) == [f"s{i}_{r}.tif" for i in range(3) for r in ("scl", "swir16", "swir22")]  # fmt: skip
    for group in groups:
        for (iy, ix), (block, half, msgs) in zip(group, composite_group(plan, group), strict=True):
            alone, alone_half, _ = composite_task(plan, iy, ix)
            np.testing.assert_array_equal(block, alone)
            np.testing.assert_array_equal(half, alone_half)
            assert msgs == []
    _FILES.clear()


@pytest.mark.parametrize("strip", [1, 7, 64])
def test_the_bilinear_kernel_in_strips_gives_gdals_pixels(
    tmp_path: Path, strip: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 20 m bands brought to 10 m a strip of rows at a time (``BILINEAR_ROWS``, for
    the CPU's cache) are GDAL's warp to the bit whatever the strip: blocks taller than
    several strips, inside the file, across its edges and its nodata holes, with the
    file's corner at odd pixels."""
    from pipelines.stages.composite import read

    monkeypatch.setattr(read, "BILINEAR_ROWS", strip)
    path = _cog(tmp_path / "b.tif", 20.0, (90, 97), X0 + 30, Y0 - 50, "uint16", seed=11)
    src = RasterSource(str(path), meta=RasterBandMetadata("uint16", 0))
    cfg = RasterLoadParams(dtype="uint16", fill_value=0, resampling="bilinear", fail_on_error=False)  # fmt: skip
    rng = np.random.default_rng(strip)
    blocks = [GeoBox((int(rng.integers(1, 190)), int(rng.integers(1, 190))), from_origin(X0 + int(rng.integers(-20, 150)) * 10, Y0 - int(rng.integers(-20, 150)) * 10, 10, 10), "EPSG:32719") for _ in range(30)]  # fmt: skip
    tall = 0
    for gb in blocks:
        ours, theirs = _ours_and_theirs(src, cfg, gb, "uint16", f"strip{strip}")
        np.testing.assert_array_equal(ours, theirs)
        tall += gb.shape.y > 2 * strip and bool((ours != 0).any())
    assert tall >= 10, "most blocks span several strips and overlap the file"
    _FILES.clear()
