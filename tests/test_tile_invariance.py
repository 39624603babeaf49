"""One tiling for the raster stages (issue 16): the tile grid, tile invariance of every
table on the demo, seams, empty and damaged tiles, and tiles on two dask workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from affine import Affine
from scipy import ndimage

from assets.change import asm_change
from assets.detection import asm_sites, mining_probability
from assets.partitions import partition_key
from assets.resources import AsmwatchSettings, DaskResource, StacResource, TorchResource
from assets.risk import RISK_ASSETS
from pipelines.infra.tiling import Tiling, TilingError
from pipelines.regions import load_regions
from pipelines.stages.sites import extract_sites
from tests.conftest import ROOT, materialize

REGION = "demo-huepetuhe"
TILE_SIZES = (128, 256)  # the demo run itself used the default, larger than its raster
TABLES = (
    "sites", "change", "summary", "risk/alerts", "risk/concession_risk", "risk/hotspots",
    "risk/protected_area_pressure",
)  # fmt: skip


# --------------------------------------------------------------------------- the grid


def test_tiles_cover_the_raster_once_with_halos_clipped_at_its_edges() -> None:
    t = Tiling(300, 520, 128, halo=8)
    assert (t.rows, t.cols, t.n_tiles) == (3, 5, 15)
    owned = np.zeros((300, 520), int)
    for tile in t.tiles():
        owned[tile.core.row0 : tile.core.row1, tile.core.col0 : tile.core.col1] += 1
        assert tile.read.row0 == max(0, tile.core.row0 - 8)
        assert tile.read.row1 == min(300, tile.core.row1 + 8)
        assert tile.read.col1 == min(520, tile.core.col1 + 8)
    assert (owned == 1).all()
    last = t.tile(2, 4)  # an edge tile is smaller, not padded
    assert last.core.shape == (300 - 256, 520 - 512)
    assert Tiling(300, 520, 4096).n_tiles == 1


@pytest.mark.parametrize("size", [100, 32, 768, 0])
def test_a_tile_size_off_the_cog_blocks_is_refused(size: int) -> None:
    with pytest.raises(TilingError, match=f"tile size {size} px: use a multiple of 512"):
        Tiling(100, 100, size)


# --------------------------------------------------------------------------- seams


def _probability(path: Path, prob: np.ndarray) -> Path:
    profile = {
        "driver": "GTiff", "width": prob.shape[1], "height": prob.shape[0], "count": 1,
        "dtype": "float32", "crs": "EPSG:32719", "nodata": float("nan"),
        "transform": Affine(10, 0, 300_000, 0, -10, 8_600_000),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(prob.astype(np.float32), 1)
        dst.update_tags(asmwatch_threshold="0.5")
    return path


@pytest.mark.parametrize("seed", range(4))
def test_sites_are_the_same_for_every_tile_size(tmp_path: Path, seed: int) -> None:
    """Smooth random fields: blobs of every shape cross tile edges and corners."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(180, 400, 2))
    field = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(1.5, 4))
    prob = (field - field.min()) / (field.max() - field.min())
    prob[rng.random((h, w)) < 0.01] = np.nan
    src = _probability(tmp_path / "p.tif", prob)
    whole = extract_sites(src, "r", "2021", mmu_ha=0.05, tile_px=4096)
    assert len(whole) > 10
    for size in (64, 128, 256):
        tiled = extract_sites(src, "r", "2021", mmu_ha=0.05, tile_px=size)
        assert list(tiled["site_id"]) == list(whole["site_id"]), size
        np.testing.assert_allclose(tiled["area_ha"], whole["area_ha"], atol=1e-6)
        np.testing.assert_allclose(tiled["mean_probability"], whole["mean_probability"], atol=1e-4)


def test_a_site_on_a_tile_corner_is_one_site(tmp_path: Path) -> None:
    """A square over the corner of four tiles, and a diagonal chain across a corner."""
    prob = np.zeros((256, 256), np.float32)
    prob[100:156, 100:156] = 0.9  # the corner of four 128 px tiles
    for k in range(20):  # 3 px blocks touching only at their corners, across row 128
        prob[100 + 3 * k : 103 + 3 * k, 200 + 3 * (k % 2) : 203 + 3 * (k % 2)] = 0.9
    src = _probability(tmp_path / "p.tif", prob)
    whole = extract_sites(src, "r", "2021", mmu_ha=0.05, tile_px=512)
    tiled = extract_sites(src, "r", "2021", mmu_ha=0.05, tile_px=128)
    assert len(tiled) == len(whole) >= 1
    assert list(tiled["site_id"]) == list(whole["site_id"])
    big = tiled.loc[tiled["area_ha"].idxmax()]
    assert big["area_ha"] == pytest.approx(56 * 56 / 100)


# --------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def tiled_runs(
    demo_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[int, Path]:
    """The demo's detection and every later table, again with 128 px and 256 px tiles."""
    regions = ROOT / "regions.yaml"
    periods = [p.id for p in load_regions(regions).get(REGION).periods]
    out = {}
    for size in TILE_SIZES:
        root = tmp_path_factory.mktemp(f"tiles-{size}") / "data"
        shutil.copytree(demo_run[0], root, symlinks=True)
        for d in ("probability", "sites", "change", "summary", "risk"):
            shutil.rmtree(root / d)
        res = {
            "settings": AsmwatchSettings(
                data_root=str(root), regions_file=str(regions), tile_px=size
            ),
            "torch_device": TorchResource(),  # as the demo
            "dask": DaskResource(processes=False, n_workers=1, threads_per_worker=2),
            "stac": StacResource(),
        }
        for period in periods:
            result = materialize(
                [mining_probability, asm_sites, asm_change, *RISK_ASSETS],
                partition_key=partition_key(REGION, period),
                resources=res,
            )
            assert result.success
            meta = result.asset_materializations_for_node("mining_probability")[0].metadata
            assert meta["settings"].value["tile_px"] == size and meta["tiles"].value > 1  # type: ignore[index,operator]
        out[size] = root
    return out


@pytest.mark.slow
def test_demo_probability_is_the_same_for_every_tile_size(
    demo_run: tuple[Path, str], tiled_runs: dict[int, Path]
) -> None:
    ref = demo_run[0] / "probability" / REGION
    for size, root in tiled_runs.items():
        for path in sorted(ref.glob("*.tif")):
            with rasterio.open(path) as a, rasterio.open(root / "probability" / REGION / path.name) as b:  # fmt: skip
                x, y = a.read(1), b.read(1)
                assert b.profile["blockxsize"] == 512 and b.overviews(1)  # a COG, as before
            assert (np.isnan(x) == np.isnan(y)).all()
            np.testing.assert_allclose(y, x, atol=1e-5, equal_nan=True, err_msg=f"{size} {path}")


@pytest.mark.slow
@pytest.mark.parametrize("table", TABLES)
def test_demo_tables_are_the_same_for_every_tile_size(
    demo_run: tuple[Path, str], tiled_runs: dict[int, Path], table: str
) -> None:
    ref_dir = demo_run[0] / table / REGION
    files = sorted(ref_dir.glob("*.parquet"))
    assert files, ref_dir
    for size, root in tiled_runs.items():
        for path in files:
            a = pq.read_table(path).to_pandas()
            b = pq.read_table(root / table / REGION / path.name).to_pandas()
            drop = [c for c in ("created_at", "bbox") if c in a]
            a, b = a.drop(columns=drop), b.drop(columns=drop)
            key = a.columns[0]
            a, b = (df.sort_values(key).reset_index(drop=True) for df in (a, b))
            assert list(a[key]) == list(b[key]), f"{size} {table} {path.name}"
            for col in a.columns:
                if a[col].dtype.kind == "f":
                    np.testing.assert_allclose(b[col], a[col], atol=1e-6, err_msg=f"{size} {table} {col}")  # fmt: skip
                elif col != "geometry":
                    assert list(a[col].astype(str)) == list(b[col].astype(str)), f"{size} {table} {col}"  # fmt: skip


# --------------------------------------------------------------------------- bad tiles


def _demo_copy(demo_run: tuple[Path, str], tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(demo_run[0], root, symlinks=True)
    return root


@pytest.mark.slow
def test_a_tile_without_a_clear_pixel_gives_nan_and_no_sites(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    from ml import registry
    from pipelines.infra.layout import composite_path
    from pipelines.stages.detection import map_probability

    root = _demo_copy(demo_run, tmp_path)
    region = load_regions(ROOT / "regions.yaml").get(REGION)
    comp = composite_path(root, REGION, "2021")
    with rasterio.open(
        comp, "r+", IGNORE_COG_LAYOUT_BREAK="YES"
    ) as dst:  # tile r1c1 of 128 px: never clear
        for b in range(1, dst.count + 1):
            dst.write(np.full((128, 128), np.nan, np.float32), b, window=((128, 256), (128, 256)))
    res = map_probability(
        root, region, "2021", record=registry.latest(root), tile_px=128, progress=lambda _m: None
    )
    with rasterio.open(res.path) as src:
        prob = src.read(1)
        transform = src.transform
    assert np.isnan(prob[128:256, 128:256]).all() and np.isfinite(prob[:128]).any()
    sites = extract_sites(res.path, REGION, "2021", tile_px=128).to_crs(32719)
    x0, y0 = transform * (128, 256)
    x1, y1 = transform * (256, 128)
    inside = sites.geometry.centroid.within(shapely.box(x0, y0, x1, y1))
    assert not inside.any()


@pytest.mark.slow
def test_a_corrupt_block_names_the_file_and_window_and_keeps_the_old_output(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    from ml import registry
    from pipelines.infra.layout import composite_path, probability_path
    from pipelines.stages.detection import DetectionError, map_probability

    root = _demo_copy(demo_run, tmp_path)
    region = load_regions(ROOT / "regions.yaml").get(REGION)
    comp = composite_path(root, REGION, "2021")
    with rasterio.open(comp) as src:  # the second block of band 1 (columns 512 on)
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_0", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_1_0", "TIFF", bidx=1))
    with comp.open("r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size))
    target = probability_path(root, REGION, "2021")
    before = target.read_bytes()
    with pytest.raises(DetectionError, match=r"2021.tif: cannot read rows \d+-\d+, cols \d+-\d+ \(row offset \d+, col offset \d+") as e:  # fmt: skip
        map_probability(root, region, "2021", record=registry.latest(root), tile_px=128, progress=lambda _m: None)  # fmt: skip
    assert "Re-materialise `composite` for demo-huepetuhe/2021" in str(e.value)
    assert target.read_bytes() == before, "the old probability stays whole"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")], "no stage left"


# --------------------------------------------------------------------------- scale-out


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    bindir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [
                str(bindir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    for k in range(2):
        procs.append(
            subprocess.Popen(
                [
                    str(bindir / "dask"),
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--memory-limit",
                    "3GiB",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                    "--name",
                    f"w{k}",
                    "--local-directory",
                    str(tmp_path / f"w{k}"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    try:
        yield address, procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
def test_tiles_run_on_two_workers_and_survive_losing_one(
    demo_run: tuple[Path, str],
    tmp_path: Path,
    two_workers: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    from distributed import Client, get_task_stream

    from ml import registry
    from pipelines.stages.detection import map_probability

    address, procs = two_workers
    root = _demo_copy(demo_run, tmp_path)
    region = load_regions(ROOT / "regions.yaml").get(REGION)
    rec = registry.latest(root)
    ref_sites = extract_sites(demo_run[0] / "probability" / REGION / "2021.tif", REGION, "2021")
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(2, timeout=120)
        with get_task_stream(client) as ts:
            res = map_probability(root, region, "2021", record=rec, tile_px=128, client=client, progress=lambda _m: None)  # fmt: skip
            sites = extract_sites(res.path, REGION, "2021", tile_px=128, client=client)
        workers = {t["worker"] for t in ts.data if str(t["key"]).startswith(("probability", "sites"))}  # fmt: skip
        assert len(workers) == 2, workers
        with rasterio.open(res.path) as a, rasterio.open(demo_run[0] / "probability" / REGION / "2021.tif") as b:  # fmt: skip
            np.testing.assert_allclose(a.read(1), b.read(1), atol=1e-5, equal_nan=True)
        assert list(sites["site_id"]) == list(ref_sites["site_id"])

        # Kill one worker after the third tile: its tiles re-run on the other.
        done = []

        def progress(msg: str) -> None:
            done.append(msg)
            if len(done) == 4 and procs[1].poll() is None:  # after the plan lines + 1 report
                os.killpg(procs[1].pid, signal.SIGKILL)

        again = map_probability(root, region, "2021", record=rec, tile_px=128, client=client, progress=progress)  # fmt: skip
        assert procs[1].poll() is not None, "the worker was killed"
        assert any("tiles done" in m for m in done[4:]), f"tiles were still to come: {done}"
        with rasterio.open(again.path) as a, rasterio.open(demo_run[0] / "probability" / REGION / "2021.tif") as b:  # fmt: skip
            np.testing.assert_allclose(a.read(1), b.read(1), atol=1e-5, equal_nan=True)


def test_local_cluster_workers_keep_glibcs_mmap_threshold() -> None:
    """Dask's MALLOC_TRIM_THRESHOLD_ freezes glibc's mmap threshold at 128 KiB (the U-Net
    tiles ran 24 % slower); the resource's workers start with WORKER_ENV beside it."""
    from pipelines.infra.tiling import WORKER_ENV

    resource = DaskResource(n_workers=1, memory_limit="1GiB")
    try:
        client = resource.client(log=None)
        env = client.run(
            lambda: {k: os.environ.get(k) for k in (*WORKER_ENV, "MALLOC_TRIM_THRESHOLD_")}
        )
        (seen,) = env.values()
        assert seen == {
            **{k: str(v) for k, v in WORKER_ENV.items()},
            "MALLOC_TRIM_THRESHOLD_": "65536",
        }
    finally:
        resource.close()


# --------------------------------------------------------------------------- COG overviews


def _float_raster(h: int, w: int, bands: int = 3) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(7)
    data = rng.random((bands, h, w), dtype=np.float32)
    data[:, rng.random((h, w)) < 0.3] = np.nan  # scattered nodata
    data[:, 200:264, 300:430] = np.nan  # and a whole 2 x 2 group of it, at every level
    profile = {
        "width": w, "height": h, "count": bands, "dtype": "float32", "crs": "EPSG:32719",
        "transform": Affine(10, 0, 300000, 0, -10, 8600000), "nodata": float("nan"),
    }  # fmt: skip
    return data, profile


def _levels(path: Path) -> list[np.ndarray]:
    with rasterio.open(path) as src:
        n = len(src.overviews(1))
    out = []
    for k in range(n):
        with rasterio.open(path, overview_level=k) as ovr:
            out.append(ovr.read())
    return out


def test_cog_overviews_written_block_by_block_are_gdals_average(tmp_path: Path) -> None:
    """staged_cog's own overview levels equal those GDAL's COG driver computes (AVERAGE,
    NaN left out) bit for bit, on a raster of several blocks whose sides halve evenly."""
    from pipelines.infra.tiling import staged_cog

    data, profile = _float_raster(1024, 1536)
    for name, kw in (("ours.tif", {}), ("gdal.tif", {"gdal_overviews": "AVERAGE"})):
        with staged_cog(tmp_path / name, profile, **kw) as dst:
            dst.write(data)
    ours, gdal = _levels(tmp_path / "ours.tif"), _levels(tmp_path / "gdal.tif")
    assert [a.shape for a in ours] == [(3, 512, 768), (3, 256, 384), (3, 128, 192)]
    for a, b in zip(ours, gdal, strict=True):
        np.testing.assert_array_equal(a, b)  # NaN where GDAL has NaN, the same means
    assert np.isnan(ours[0][:, 100:132, 150:215]).all()  # the nodata patch stays nodata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gdal.tif", "ours.tif"]


def test_cog_overviews_of_odd_sides_average_what_each_group_has(tmp_path: Path) -> None:
    """Odd rows and columns: each level is rounded up (gdaladdo's sizes), the last row and
    column average the pixels they have; the file is a COG with its tags and bands."""
    from pipelines.infra.tiling import reduce_average, staged_cog

    data, profile = _float_raster(1101, 1333, bands=2)
    target = tmp_path / "odd.tif"
    with staged_cog(target, profile) as dst:
        dst.write(data)
        dst.set_band_description(2, "B03")
        dst.update_tags(period="2021")
    levels = _levels(target)
    assert [a.shape[1:] for a in levels] == [(551, 667), (276, 334), (138, 167), (69, 84)]
    padded = np.pad(data.astype(np.float64), ((0, 0), (0, 1), (0, 1)), constant_values=np.nan)
    groups = padded.reshape(2, 551, 2, 667, 2)
    with np.errstate(invalid="ignore"):
        want = np.nansum(groups, axis=(2, 4)) / (~np.isnan(groups)).sum(axis=(2, 4))
    np.testing.assert_allclose(levels[0], want, rtol=1e-6)
    assert np.array_equal(np.isnan(levels[0]), np.isnan(want))
    np.testing.assert_array_equal(levels[1], reduce_average(levels[0]))
    with rasterio.open(target) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.descriptions == (None, "B03") and src.tags()["period"] == "2021"
        assert src.block_shapes[0] == (512, 512) and np.isnan(src.nodata)
        np.testing.assert_array_equal(src.read(), data)
    assert [p.name for p in tmp_path.iterdir()] == ["odd.tif"]  # no stage, levels or VRT


def test_cog_overviews_refuse_a_raster_they_cannot_average(tmp_path: Path) -> None:
    """An integer raster, or a float one whose nodata is a number, would be averaged
    wrongly: refused by name before a block is written, the previous file kept."""
    from pipelines.infra.tiling import staged_cog

    target = tmp_path / "p.tif"
    target.write_bytes(b"previous")
    data, profile = _float_raster(300, 300, bands=1)
    for bad in ({"dtype": "uint16", "nodata": 0}, {"nodata": -9999.0}):
        with (
            pytest.raises(ValueError, match=r"/p\.tif: average overviews need a float raster"),
            staged_cog(target, {**profile, **bad}) as dst,
        ):
            dst.write(np.nan_to_num(data).astype(bad.get("dtype", "float32")))
        assert target.read_bytes() == b"previous"
        assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]
