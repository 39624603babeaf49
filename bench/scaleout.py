"""Benchmark: the composite stage on a dask.distributed cluster of separate worker
processes, 1 worker then 2 (same scheduler, same data), and the speed-up.

A simulated period (default 16 scenes on 1536 x 1536 px at 10 m, the demo's place) is
written as COGs and a scenes table under a temporary data root; `dask scheduler` and
`dask worker` processes (1 thread each) run on 127.0.0.1 as an operator would start them
on several machines. Each run builds the whole composite (reads, masked median, COG
write); both must give identical pixels.
Run: ``.venv/bin/python bench/scaleout.py [--size 1536] [--scenes 16] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cluster import ProcessCluster  # noqa: E402


def main() -> int:
    import numpy as np
    import rasterio
    from distributed import Client

    from pipelines.embedded.simulator import load_items, simulate_world
    from pipelines.infra.layout import scenes_path
    from pipelines.regions import EmbeddedSpec, load_regions
    from pipelines.stages.composite import composite_for_region
    from pipelines.stages.stac.geoparquet import write_geoparquet
    from pipelines.stages.stac.normalize import normalize_items

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1536)
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-workers", type=int, default=2)
    args = ap.parse_args()

    demo = load_regions(ROOT / "regions.yaml").get("demo-huepetuhe")
    w, s, _, _ = demo.bbox
    deg = args.size * 10 / 111_000
    bbox = (w, s, w + deg * 1.03, s + deg)
    geometry = {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]],
                [bbox[2], bbox[3]], [bbox[0], bbox[3]], [bbox[0], bbox[1]]]]}  # fmt: skip
    region = dataclasses.replace(
        demo, id="scaleout", bbox=bbox, geometry=geometry, periods=demo.periods[-1:],
        embedded=EmbeddedSpec(seed=5, scenes_per_period=args.scenes, reprocessed_twins=False),
    )  # fmt: skip
    period = region.periods[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        t = time.perf_counter()
        simulate_world(region, Path(tmp) / "world")
        items = [sc.to_item({"asmwatch:region": region.id, "asmwatch:period": period.id})
                 for sc in normalize_items(load_items(Path(tmp) / "world")).scenes]  # fmt: skip
        write_geoparquet(items, scenes_path(root, region.id, period.id))
        print(f"simulated {len(items)} scenes of {args.size} x {args.size} px in {time.perf_counter() - t:.1f} s")  # fmt: skip
        times: dict[int, float] = {}
        pixels: dict[int, np.ndarray] = {}
        with ProcessCluster(Path(tmp) / "cluster") as cluster:
            client = Client(scheduler_file=str(cluster.file), timeout="60s")
            for n in range(1, args.max_workers + 1):
                cluster.add_worker(client)
                best = float("inf")
                for _ in range(args.repeats):
                    client.run(lambda: __import__("gc").collect())
                    t = time.perf_counter()
                    res = composite_for_region(region, period, root, client=client, chunk=args.chunk, progress=lambda _m: None)  # fmt: skip
                    best = min(best, time.perf_counter() - t)
                times[n] = best
                with rasterio.open(res.path) as src:
                    pixels[n] = src.read()
                print(f"{n} worker process(es): {best:.2f} s (best of {args.repeats})", flush=True)  # fmt: skip
            client.close()
        same = all(np.array_equal(pixels[1], p, equal_nan=True) for p in pixels.values())
        mpx = args.size**2 / 1e6
        for n, sec in times.items():
            print(f"  {n}: {mpx / sec:.2f} Mpx/s of composite, speed-up x{times[1] / sec:.2f} vs 1 worker")  # fmt: skip
        print(f"identical pixels across runs: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
