"""Benchmark: the composite stage against the bound of decoding its input COGs.

A world of the embedded simulator (``--mpx`` Mpx at 10 m around the demo's centre, or
``--km`` km square; ``--scenes`` acquisitions of one period, no reprocessed twins) is
written once into ``--work``. Then, on the same 2 cores:

- **decode bound**: every file the composite reads (the six reflectance bands and SCL of
  every scene), decoded whole with rasterio on a pool of as many threads as cores (GDAL
  releases the GIL), each once;
- **stage**: ``build_composite`` from the items (search results in) to the composite COG
  written with its overviews, on a LocalCluster of 2 workers x 1 thread as the asset
  runs it (cluster start-up timed apart).

It prints both, their ratio and the bytes decoded. Issue 20's target is a ratio of at
most 2.0 at 1 Mpx x 20 scenes and at a full 10980 px tile x 20 scenes
(``--km 109.8``: about 19 GB of simulated COGs and 40 minutes to simulate on 2 cores,
estimated from the 256x world's 7.8 MB and 1.0 s per Mpx and scene).

    .venv/bin/python bench/composite_io.py                    # 1 Mpx x 20 scenes
    .venv/bin/python bench/composite_io.py --mpx 4 --scenes 10
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import _client, simulated_region  # noqa: E402


def world(work: Path, mpx: float | None, km: float | None, scenes: int) -> tuple[Any, Path]:
    """The simulated region and its world folder, simulated unless already there."""
    from pipelines.embedded.simulator import simulate_world

    _, demo_mpx = simulated_region(1, None, scenes)  # the demo's own area
    region, _ = simulated_region((mpx or 1.0) / demo_mpx, km, scenes)
    folder = work / (f"{km:g}km-{scenes}scenes" if km else f"{mpx:g}mpx-{scenes}scenes")
    if not (folder / "world.json").exists():
        t = time.perf_counter()
        simulate_world(region, folder, progress=lambda m: print(f"  {m}", flush=True))
        print(f"simulated {folder} in {time.perf_counter() - t:.1f} s", flush=True)
    return region, folder


def decode_bound(items: list[dict[str, Any]], threads: int) -> tuple[float, int, int]:
    """Seconds to decode every band file the composite reads, once; (s, files, bytes)."""
    import rasterio

    from pipelines.stages.composite import LOAD_ROLES

    hrefs = [item["assets"][role]["href"] for item in items for role in LOAD_ROLES]

    def decode(href: str) -> int:
        with rasterio.open(href.removeprefix("file://")) as src:
            return int(src.read().nbytes)

    with rasterio.Env():  # one GDAL environment, as a worker has
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(decode, hrefs))
        return time.perf_counter() - t, len(hrefs), sum(sizes)


def stage(region: Any, items: list[dict[str, Any]], target: Path) -> tuple[float, float, list[str]]:
    """``build_composite`` on a fresh LocalCluster: (stage s, cluster s, its progress
    lines with the seconds since the start, where the time goes)."""
    from pipelines.stages.composite import build_composite, region_geobox

    t = time.perf_counter()
    client = _client()
    client.wait_for_workers(2)
    cluster_s = time.perf_counter() - t
    lines: list[str] = []
    try:
        t = time.perf_counter()
        build_composite(
            items, region_geobox(region), target, region=region.id, period="2021",
            aoi=region.geometry, client=client,
            progress=lambda m: lines.append(f"{time.perf_counter() - t:7.2f} s  {m}"),
        )  # fmt: skip
        return time.perf_counter() - t, cluster_s, lines
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mpx", type=float, default=1.0, help="region size in Mpx at 10 m")
    ap.add_argument("--km", type=float, default=None, help="a square region this many km across")
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--work", type=Path, default=None, help="keeps the simulated world")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many of each")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="asmwatch-composite-io-"))
    work.mkdir(parents=True, exist_ok=True)
    from pipelines.embedded.simulator import load_items

    region, folder = world(work, None if args.km else args.mpx, args.km, args.scenes)
    items = [i for i in load_items(folder) if i["id"].endswith("_0_L2A")]
    threads = len(os.sched_getaffinity(0))
    decodes = [decode_bound(items, threads) for _ in range(args.repeats)]
    runs = [stage(region, items, work / f"{folder.name}.tif") for _ in range(args.repeats)]
    dec_s, files, nbytes = min(decodes)
    stage_s, cluster_s, lines = min(runs)
    size = (work / f"{folder.name}.tif").stat().st_size
    print(
        f"{folder.name}: {len(items)} scenes, {files} files, {nbytes / 2**20:.0f} MiB decoded; "
        f"{threads} cores"
    )
    print(f"  decode bound   {dec_s:8.2f} s   (runs: {', '.join(f'{d[0]:.2f}' for d in decodes)})")
    print(
        f"  composite      {stage_s:8.2f} s   (runs: {', '.join(f'{r[0]:.2f}' for r in runs)}; "
        f"cluster start {cluster_s:.1f} s apart; COG {size / 1e6:.1f} MB)"
    )
    ratio = stage_s / dec_s
    print(f"  ratio          {ratio:8.2f}x  (issue 20's target: at most 2.0)")
    print("  the fastest run's progress:")
    for line in lines:
        print(f"    {line}")
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    raise SystemExit(main())
