"""asm_change at scale: sites x history rows, the overlay and the first-seen look-up.

Synthetic but shaped like a real region: ``n`` sites of this period (squares and
L-shapes of 0.5-4 ha on a jittered grid), the previous period's sites (most overlap a
site of this period, some are gone), and the previous period's change rows as history
(each previous site with an older first-seen period, and abandoned land besides). The
composite for the NDVI means is a real COG of the same area (NDVI a smooth field).

    python -m bench.change            # 1,000 / 10,000 / 100,000 sites
    python -m bench.change --n 2000 --baseline   # also the old whole-union code path

The tables are written as GeoParquet and ``change_table`` runs from them in a fresh
process, as ``asm_change`` runs it. Prints seconds and that process's peak RSS per size
and, with ``--baseline``, the ratio against the code path of commit 5ae7639 (the overlay
per site against the whole union, on frames), run in this process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.infra.grid import bbox_utm_epsg
from pipelines.regions import parse_regions

REGION = parse_regions(
    {
        "regions": [
            {
                "id": "bench",
                "aoi": {"bbox": [-70.9, -13.4, -69.9, -12.5]},
                "periods": [2019, 2020, 2021],
            }
        ]
    }
).regions[0]
EPSG = bbox_utm_epsg(REGION.bbox)
X0, Y0 = 300_000.0, 8_520_000.0


def world(n: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """(current sites, previous sites, previous change) GeoDataFrames in EPSG:4326."""
    import geopandas as gpd
    import shapely

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    pitch = 300.0
    ij = np.stack(np.divmod(np.arange(n), side), axis=1).astype(float)
    x = X0 + ij[:, 1] * pitch + rng.uniform(0, 60, n)
    y = Y0 + ij[:, 0] * pitch + rng.uniform(0, 60, n)
    w = np.round(rng.uniform(70, 200, n) / 10) * 10
    h = np.round(rng.uniform(70, 200, n) / 10) * 10
    x, y = np.round(x / 10) * 10, np.round(y / 10) * 10
    cur = shapely.box(x, y, x + w, y + h)
    ell = rng.random(n) < 0.3  # some L-shapes
    cur[ell] = shapely.union(cur[ell], shapely.box(x[ell], y[ell] - 40, x[ell] + 40, y[ell]))
    shift = np.round(rng.uniform(-40, 40, (n, 2)) / 10) * 10
    prev = shapely.box(x + shift[:, 0], y + shift[:, 1], x + shift[:, 0] + w * 0.8, y + shift[:, 1] + h * 0.8)  # fmt: skip
    keep_prev = rng.random(n) < 0.9
    new = rng.random(n) < 0.15  # sites with no previous mining
    prev = prev[keep_prev & ~new]
    gone = shapely.box(x + w + 20, y, x + w + 60, y + 60)[rng.random(n) < 0.3]  # abandoned
    history = np.concatenate([prev, gone])
    first = rng.choice(["2019", "2020"], len(history))

    def frame(geoms: Any, period: str, extra: dict[str, Any]) -> Any:
        f = gpd.GeoDataFrame(
            {"site_id": [f"{period}-{i}" for i in range(len(geoms))], "region": "bench",
             "period": period, "area_ha": shapely.area(geoms) / 1e4, **extra},
            geometry=geoms, crs=EPSG,
        )  # fmt: skip
        return f.to_crs(4326)

    cur_f = frame(cur, "2021", {"first_seen_period": [None] * len(cur)})
    prev_f = frame(prev, "2020", {"first_seen_period": [None] * len(prev)})
    hist_f = frame(history, "2020", {"first_seen_period": first, "kind": "stable"})
    return cur_f, prev_f, hist_f


def composite(path: Path, n: int) -> Path:
    """A two-band COG (B04, NDVI) over the bench area, NDVI a smooth random field."""
    import rasterio
    from rasterio.transform import from_origin
    from scipy import ndimage

    side = int(np.ceil(np.sqrt(n))) * 30 + 100
    rng = np.random.default_rng(1)
    field = ndimage.zoom(rng.random((side // 50 + 2, side // 50 + 2)), 50, order=1)[:side, :side]
    profile = {
        "driver": "COG", "width": side, "height": side, "count": 2, "dtype": "float32",
        "crs": f"EPSG:{EPSG}", "transform": from_origin(X0 - 500, Y0 + side * 10 - 500, 10, 10),
        "compress": "DEFLATE", "blocksize": 512,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack([field * 0, field.astype(np.float32)]))
        dst.set_band_description(1, "B04")
        dst.set_band_description(2, "NDVI")
    return path


def tables(directory: Path, n: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """The ``world`` of ``n`` sites written as GeoParquet, as the sites and change assets
    write them: (current sites, previous sites, previous change)."""
    paths = tuple(directory / f"{name}-{n}.parquet" for name in ("sites", "previous", "history"))
    for frame, path in zip(world(n, seed), paths, strict=True):
        frame.to_parquet(path, write_covering_bbox=True, index=False)
    return paths  # type: ignore[return-value]


def _run(
    sites: Path, previous: Path, history: Path, comp: Path, target: Path
) -> tuple[float, int, float]:
    """``change_table`` in this (fresh) process: (seconds, rows, peak RSS GiB).

    The peak is the kernel's high-water mark of this process's own memory (``VmHWM``),
    not ``ru_maxrss``, which keeps the RSS of the parent it was forked from.
    """
    from pipelines.stages.change import change_table

    t = time.perf_counter()
    res = change_table(
        REGION, "2021", sites, previous, target, previous_change=history, composite=comp
    )
    s = time.perf_counter() - t
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return s, res.rows, hwm / 2**20


def main(argv: list[str] | None = None) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow.parquet as pq

    from pipelines.stages.change import mining_ha

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    ap.add_argument("--baseline", action="store_true", help="also time the old code path")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="asmwatch-bench-change-"))
    print(f"{'sites':>8} {'history':>8} {'rows':>8} {'seconds':>8} {'us/site':>8} {'peak GiB':>8}")
    for n in args.n:
        sites, previous, history = tables(tmp, n)
        comp = composite(tmp / f"c{n}.tif", n)
        target = tmp / f"change-{n}.parquet"
        # the stage in a fresh process: its peak is its own, not the world's building
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            s, rows, peak = pool.submit(_run, sites, previous, history, comp, target).result()
        hist = pq.read_metadata(history).num_rows
        print(f"{n:>8} {hist:>8} {rows:>8} {s:>8.2f} {s / n * 1e6:>8.0f} {peak:>8.2f}")
        if args.baseline:
            import geopandas as gpd

            from bench._change_baseline import detect_change as old

            cur, prev, hist_f = (gpd.read_parquet(p) for p in (sites, previous, history))
            t = time.perf_counter()
            ref = old(REGION, "2021", cur, prev, previous_change=hist_f, composite=comp)
            b = time.perf_counter() - t
            same = np.isclose(mining_ha(target), ref.frame["area_ha"].sum())
            print(f"{'':>8} baseline (5ae7639) {b:.2f} s, ratio {b / s:.1f}x faster; same total area: {same}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
