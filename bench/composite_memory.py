"""Benchmark: peak memory per dask worker for a full Sentinel-2 tile with 20 scenes.

The issue's bound: a full 10980 x 10980 tile with 20 scenes composites within 4 GB peak
memory per worker. This writes full-size L2A-shaped COGs once (10 m bands at 10980 px,
B11/B12/SCL at 5490 px, uint16/uint8, deflate, textured so they compress like real
data) under --cache, points 20 dated items at them (cycling through --distinct file
sets with different cloud masks, each scene through links of its own: scenes sharing
paths would share GDAL's decoded tiles), and runs ``build_composite`` on a LocalCluster of
--workers single-threaded worker processes with ``memory_limit=--limit``. A sampler
polls every worker's RSS twice a second; the figures printed are the peak per worker,
the client's peak RSS and the wall time. Exit status 1 if any worker peaked above the
limit or died. Smaller runs: ``--size 2745`` (a quarter tile edge).

Run: ``.venv/bin/python bench/composite_memory.py [--size 10980] [--scenes 20]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.stages.composite import build_composite  # noqa: E402
from pipelines.stages.stac.normalize import ROLE_BANDS, ROLE_RESOLUTION  # noqa: E402

X0, Y1 = 300_000.0, 8_600_020.0  # 19LCF's upper-left corner
EPSG = 32719


def write_tile(directory: Path, size: int, seed: int) -> dict[str, tuple[Path, int]]:
    """One scene's band files at full size; returns role -> (path, pixels per side)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    rng = np.random.default_rng(seed)
    for role, band in ROLE_BANDS.items():
        res = ROLE_RESOLUTION[role]
        n = size * 10 // res
        path = directory / f"{band}.tif"
        out[role] = (path, n)
        if path.exists():
            continue
        dtype = "uint8" if role == "scl" else "uint16"
        profile = {
            "driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": dtype,
            "crs": f"EPSG:{EPSG}", "transform": Affine(res, 0, X0, 0, -res, Y1), "nodata": 0,
            "tiled": True, "blockxsize": 1024, "blockysize": 1024, "compress": "deflate",
            "predictor": 2, "BIGTIFF": "IF_SAFER",
        }  # fmt: skip
        tmp = path.with_suffix(".partial.tif")
        with rasterio.open(tmp, "w", **profile) as dst:
            for y in range(0, n, 1024):
                h = min(1024, n - y)
                yy, xx = np.mgrid[y : y + h, 0:n].astype(np.float32)
                base = 1500 + 800 * np.sin(xx / 97.0 + seed) * np.cos(yy / 131.0)
                if role == "scl":
                    cloud = (np.sin(xx / 53.0 + seed * 1.7) * np.sin(yy / 71.0) > 0.6) * 4
                    block = (4 + cloud).astype(np.uint8)  # 4 vegetation, 8 cloud
                else:
                    noise = rng.integers(0, 64, size=base.shape)
                    block = (base + noise).astype(np.uint16)
                dst.write(block, 1, window=rasterio.windows.Window(0, y, n, h))
        tmp.rename(path)
    return out


def scene_files(
    files: dict[str, tuple[Path, int]], folder: Path, i: int
) -> dict[str, tuple[Path, int]]:
    """Scene ``i``'s own paths to a file set: links under ``folder``/scene<i>. Scenes
    that shared paths would share GDAL's open datasets and their decoded tiles, so
    a block would decode each file set once and read the other scenes from the cache
    (a real tile's 20 scenes are 20 files each)."""
    own = folder / f"scene{i:02d}"
    own.mkdir(parents=True, exist_ok=True)
    out = {}
    for role, (path, n) in files.items():
        link = own / path.name
        if not link.is_symlink():
            link.symlink_to(path.resolve())
        out[role] = (link, n)
    return out


def item(i: int, files: dict[str, tuple[Path, int]]) -> dict[str, Any]:
    when = dt.datetime(2021, 6, 1, 14, 50) + dt.timedelta(days=5 * i)
    assets = {}
    for role, (path, n) in files.items():
        res = ROLE_RESOLUTION[role]
        # dtypes as the scenes stage's normalised items carry them (without, odc-stac
        # would load float32 and the stage take the slower general reader)
        band: dict[str, Any] = {"nodata": 0, "data_type": "uint8" if role == "scl" else "uint16"}
        if role != "scl":
            band |= {"scale": 1e-4, "offset": -0.1}
        assets[role] = {
            # the scene's own link, not resolved to the file set it points at
            "href": path.absolute().as_uri(), "roles": ["data"], "raster:bands": [band],
            "proj:shape": [n, n], "proj:transform": [res, 0, X0, 0, -res, Y1],
        }  # fmt: skip
    x1, y0 = X0 + 109_800, Y1 - 109_800
    from pyproj import Transformer

    t = Transformer.from_crs(EPSG, 4326, always_xy=True)
    xs, ys = t.transform([X0, x1, x1, X0, X0], [Y1, Y1, y0, y0, Y1])
    ring = [[float(a), float(b)] for a, b in zip(xs, ys, strict=True)]
    return {
        "type": "Feature", "stac_version": "1.0.0", "stac_extensions": [],
        "id": f"S2A_19LCF_{when:%Y%m%d}_0_L2A", "collection": "sentinel-2-l2a",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [min(xs), min(ys), max(xs), max(ys)],
        "properties": {"datetime": when.isoformat() + "Z", "proj:epsg": EPSG},
        "links": [], "assets": assets,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10980, help="10 m pixels per tile side")
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--distinct", type=int, default=2, help="distinct file sets to cycle")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", default="4GiB", help="memory_limit per worker")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--cache", default=str(ROOT / "data" / "bench" / "fulltile"))
    args = ap.parse_args()

    from dask.utils import parse_bytes
    from distributed import Client, LocalCluster
    from odc.geo.geobox import GeoBox

    cache = Path(args.cache) / str(args.size)
    t = time.perf_counter()
    sets = [write_tile(cache / f"set{k}", args.size, seed=k) for k in range(args.distinct)]
    print(f"tile files ready under {cache} in {time.perf_counter() - t:.1f} s")
    scenes = cache / "scenes"
    items = [item(i, scene_files(sets[i % len(sets)], scenes, i)) for i in range(args.scenes)]
    geobox = GeoBox((args.size, args.size), Affine(10, 0, X0, 0, -10, Y1), f"EPSG:{EPSG}")
    limit = parse_bytes(args.limit)

    peaks: dict[str, int] = {}
    stop = threading.Event()

    with LocalCluster(
        n_workers=args.workers, threads_per_worker=1, memory_limit=args.limit,
        processes=True, host="127.0.0.1", scheduler_kwargs={"dashboard": False},
    ) as cluster, Client(cluster) as client:  # fmt: skip
        workers_at_start = set(client.scheduler_info()["workers"])

        def rss() -> int:
            import psutil

            return int(psutil.Process().memory_info().rss)

        def sample() -> None:
            while not stop.is_set():
                try:
                    for w, v in client.run(rss).items():
                        peaks[w] = max(peaks.get(w, 0), v)
                except Exception:  # a worker restarting: the final check reports it
                    pass
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with tempfile.TemporaryDirectory(dir=cache) as out:
            t = time.perf_counter()
            res = build_composite(
                items, geobox, Path(out) / "composite.tif", client=client, chunk=args.chunk,
                progress=lambda m: print(f"  [{time.perf_counter() - t:6.1f} s] {m}", flush=True),
            )  # fmt: skip
            wall = time.perf_counter() - t
            size_gb = res.size_bytes / 1e9
        stop.set()
        sampler.join()
        workers_at_end = set(client.scheduler_info()["workers"])

    client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"full composite: {args.size} x {args.size} px, {args.scenes} scenes, "
        f"{args.workers} workers x 1 thread, limit {args.limit} each, chunks {args.chunk}"
    )
    for w, v in sorted(peaks.items()):
        print(f"  worker {w}: peak RSS {v / 2**30:.2f} GiB ({v / limit:.0%} of the limit)")
    print(f"  client process peak RSS {client_peak / 2**30:.2f} GiB")
    print(f"  wall {wall:.0f} s, COG {size_gb:.2f} GB, valid fraction {res.valid_fraction:.3f}")
    restarted = workers_at_start != workers_at_end
    ok = bool(peaks) and max(peaks.values()) <= limit and not restarted
    print("within the memory bound" if ok else "MEMORY BOUND EXCEEDED or a worker restarted")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
