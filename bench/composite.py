"""Benchmark: asmwatch's composite kernel vs the naive xarray median, same data, same process.

The stack is a simulated Sentinel-2 period (clouds, shadows and SCL as in L2A): by
default 20 scenes on a 512 x 512 grid at 10 m, the size the issue names. It is loaded
once with odc-stac into dask and persisted in memory; then both reductions run on that
same dask data with the same threaded scheduler (2 workers unless --workers):

* naive:    reflectance = DN * scale + offset; ``.where(dn != 0).where(clear)
            .median("time")`` per band (what ``xarray`` users write; NaN medians);
* asmwatch: ``composite_array`` (sorting-network masked median on uint16 DN, plus the
            clear count and NDVI/MNDWI/BSI, which the naive run does not even compute).

Prints wall time (best of --repeats) and peak traced memory (tracemalloc: numpy's
allocations) of each, their ratios, and checks the six medians agree to 1e-6.
Run: ``.venv/bin/python bench/composite.py [--size 512] [--scenes 20] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.embedded.simulator import load_items, simulate_world  # noqa: E402
from pipelines.regions import EmbeddedSpec, load_regions  # noqa: E402
from pipelines.stages.composite import (  # noqa: E402
    REFLECTANCE_BANDS,
    composite_array,
    load_stack,
    naive_composite,
    plan_observations,
    region_geobox,
)
from pipelines.stages.stac.l1c import pair_l1c  # noqa: E402
from pipelines.stages.stac.normalize import normalize_items  # noqa: E402


def measure(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best wall time (s), peak traced memory (MiB) and the last result."""
    best, peak, out = float("inf"), 0.0, None
    for _ in range(repeats):
        tracemalloc.start()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
        peak = max(peak, tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
    return best, peak, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="grid edge in pixels (10 m)")
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="dask threads for both runs")
    ap.add_argument("--chunk", type=int, default=256, help="spatial chunk edge")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--s2cloudless",
        action="store_true",
        help="also time the s2cloudless option (L1C twins simulated) against SCL alone",
    )
    args = ap.parse_args()

    demo = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    # A square AOI of --size pixels at the demo's place, one dry season of --scenes looks.
    w, s, _, _ = demo.bbox
    deg = args.size * 10 / 111_000
    bbox = (w, s, w + deg * 1.03, s + deg)
    geometry = {
        "type": "Polygon",
        "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                         [bbox[0], bbox[3]], [bbox[0], bbox[1]]]],
    }  # fmt: skip
    region = dataclasses.replace(
        demo, id="bench", bbox=bbox, geometry=geometry, periods=demo.periods[-1:],
        embedded=EmbeddedSpec(seed=11, scenes_per_period=args.scenes, reprocessed_twins=False),
        cloud_mask="scl+s2cloudless" if args.s2cloudless else "scl",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        simulate_world(region, Path(tmp) / "w")
        raw = load_items(Path(tmp) / "w")
        scenes = normalize_items(raw).scenes
        if args.s2cloudless:
            scenes = pair_l1c(scenes, raw).scenes
        items = [sc.to_item() for sc in scenes]
        print(f"simulated {len(items)} scenes in {time.perf_counter() - t:.1f} s")
        geobox = region_geobox(region)
        tagged, obs = plan_observations(items, lon=bbox[0])
        with dask.config.set(scheduler="threads", num_workers=args.workers):
            t = time.perf_counter()
            ds = load_stack(tagged, geobox, chunk=args.chunk, s2cloudless=args.s2cloudless)
            ds = ds.persist()
            load_s = time.perf_counter() - t
            print(
                f"stack: {len(obs)} observations x {len(REFLECTANCE_BANDS)} bands x "
                f"{geobox.shape.y} x {geobox.shape.x} px, chunks of {args.chunk}, "
                f"{args.workers} dask threads; loaded from COGs in {load_s:.2f} s"
            )
            naive_s, naive_mb, naive = measure(
                lambda: naive_composite(ds, obs).compute(), args.repeats
            )
            ours_s, ours_mb, ours = measure(
                lambda: composite_array(ds, obs).compute(), args.repeats
            )
            if args.s2cloudless:
                s2c_s, s2c_mb, s2c = measure(
                    lambda: composite_array(ds, obs, s2cloudless=True).compute(), args.repeats
                )
                count = len(REFLECTANCE_BANDS)
                dropped = 1 - s2c[count].sum() / ours[count].sum()
                print(
                    f"with s2cloudless: {s2c_s:.3f} s (x{s2c_s / ours_s:.1f} of SCL alone), "
                    f"peak {s2c_mb:.1f} MiB; it removes {dropped:.1%} of the clear observations"
                )
    worst = max(
        float(np.nanmax(np.abs(ours[i] - naive[b].values))) for i, b in enumerate(REFLECTANCE_BANDS)
    )
    same_nan = all(
        (np.isnan(ours[i]) == np.isnan(naive[b].values)).all()
        for i, b in enumerate(REFLECTANCE_BANDS)
    )
    print(f"naive  ds.where(clear).median('time'): {naive_s:8.3f} s  peak {naive_mb:8.1f} MiB")
    print(f"asmwatch composite_array:              {ours_s:8.3f} s  peak {ours_mb:8.1f} MiB")
    print(
        f"speed-up: {naive_s / ours_s:.1f}x   memory ratio (ours/naive): {ours_mb / naive_mb:.2f}"
    )
    print(f"agreement: max |diff| {worst:.2e} reflectance, same nodata pixels: {same_nan}")
    ok = worst <= 1e-6 and same_nan
    print("outputs agree to float tolerance" if ok else "OUTPUTS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
