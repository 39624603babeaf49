"""Benchmark: alerts over many concessions; memory bounded, time linear?

A demo-sized region (about 5 km) is crowded with N concessions (200-800 m squares) and
100 new-mining change areas (64-vertex polygons of 1-4 ha), so that every change area
lies within the alert distance of most concessions: the alert_features table has a
row per change area and concession nearby, about 100 x N rows, each with its change
area's geometry (the alerts table has one row per change area: 100). The issue's case: 200,000 concessions crashed `alerts` at 20 GiB (Arrow's
2 GiB arrays).

For N/10 and N concessions, each in a fresh process so peak memory is its own:
- `streamed`: ``pipelines.stages.risk.write_rows`` (DuckDB writes the Parquet file itself,
  row group by row group, within ``MEMORY_LIMIT``), what the asset runs;
- `in memory` (the baseline, the previous code path): ``compute`` to an Arrow table,
  then ``write_table`` through GeoPandas.
Printed: seconds, peak RSS and rows for each, and the ratios N / (N/10) (linear: 10x
time; bounded: about 1x memory).

Run: ``.venv/bin/python bench/alerts.py --concessions 20000`` (about 2 million alert
rows; a few minutes), ``--concessions 200000 --skip-baseline`` for the issue's size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BBOX = (-70.56, -13.01, -70.51, -12.965)  # the demo region's
CHANGES = 100


def region() -> object:
    from pipelines.regions import parse_regions

    doc = {"regions": [{"id": "bench", "aoi": {"bbox": list(BBOX)}, "periods": [2019, 2020]}]}
    return parse_regions(doc).regions[0]


def write_world(root: Path, n_concessions: int, seed: int = 7) -> None:
    import geopandas as gpd
    import shapely

    from pipelines.infra.layout import change_path, context_table_path
    from pipelines.stages.catalog import refresh_views
    from pipelines.stages.context import COLUMNS as CTX

    rng = np.random.default_rng(seed)
    w, s, e, n = BBOX
    x, y = rng.uniform(w, e, CHANGES), rng.uniform(s, n, CHANGES)
    radius = rng.uniform(60, 110, CHANGES) / 111_000  # 1-4 ha
    change = gpd.GeoDataFrame(
        {"change_id": [f"c{i}" for i in range(CHANGES)], "region": "bench", "period": "2020",
         "kind": "new", "area_ha": np.pi * (radius * 111_000) ** 2 / 1e4,
         "first_seen_period": "2020", "site_id": [f"s{i}" for i in range(CHANGES)], "mean_ndvi": np.nan},
        geometry=[shapely.Point(a, b).buffer(r, quad_segs=16) for a, b, r in zip(x, y, radius, strict=True)],
        crs=4326,
    )  # fmt: skip
    path = change_path(root, "bench", "2020")
    path.parent.mkdir(parents=True, exist_ok=True)
    change.to_parquet(path, write_covering_bbox=True, index=False)
    cx, cy = rng.uniform(w - 0.02, e + 0.02, n_concessions), rng.uniform(s - 0.02, n + 0.02, n_concessions)  # fmt: skip
    size = rng.uniform(200, 800, n_concessions) / 111_000
    conc = gpd.GeoDataFrame(
        {"region": "bench", "layer": "concessions",
         "feature_id": [f"LSM-{i:06d}" for i in range(n_concessions)],
         "name": [f"Concesion minera {i}" for i in range(n_concessions)], "category": None,
         "area_ha": None, "holder": None, "status": None, "population": None, "date": None,
         "place": None, "concession_id": None, "attributes": "{}", "source_file": "bench"},
        geometry=list(shapely.box(cx, cy, cx + size, cy + size)), crs=4326,
    )  # fmt: skip
    path = context_table_path(root, "bench", "concessions")
    path.parent.mkdir(parents=True, exist_ok=True)
    conc[list(CTX)].to_parquet(path, write_covering_bbox=True, index=False)
    refresh_views(root)


def _run(variant: str, root: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    import pyarrow.parquet as pq

    from pipelines.stages.risk import compute, write_rows, write_table

    t = time.perf_counter()
    if variant == "streamed":  # alerts and alert_features, from one computation
        alerts = write_rows(Path(root), "alerts", region(), "2020")  # type: ignore[arg-type]
        path = alerts.parents[2] / "alert_features" / alerts.parent.name / alerts.name
    else:
        rows = compute(Path(root), "alert_features", region(), "2020")  # type: ignore[arg-type]
        path = write_table(rows, Path(root), "alert_features", "bench", "2020")
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # GB (ru_maxrss in KB)
    out.put({"seconds": seconds, "peak_gb": peak, "rows": pq.read_metadata(path).num_rows})


def measure(variant: str, root: Path) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    p = ctx.Process(target=_run, args=(variant, str(root), q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"seconds": float("nan"), "peak_gb": float("nan"), "rows": -1, "exit": p.exitcode}
    return dict(q.get())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concessions", type=int, default=20_000)
    ap.add_argument("--skip-baseline", action="store_true", help="only the streamed writer")
    args = ap.parse_args()
    sizes = (args.concessions // 10, args.concessions)
    variants = ["streamed"] + ([] if args.skip_baseline else ["in memory"])
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = Path(tmp) / str(n)
            write_world(root, n)
            for v in variants:
                r = results[(v, n)] = measure(v, root)
                print(f"{n:>8,} concessions  {v:10} {r['seconds']:8.2f} s  peak {r['peak_gb']:5.2f} GB  {int(r['rows']):>11,} rows", flush=True)  # fmt: skip
    print(
        f"\n{'variant':10} {'time x':>7} {'memory x':>9}  (N / N/10; linear time 10x, bounded memory ~1x)"
    )
    for v in variants:
        a, b = results[(v, sizes[0])], results[(v, sizes[1])]
        print(f"{v:10} {b['seconds'] / a['seconds']:7.1f} {b['peak_gb'] / a['peak_gb']:9.2f}")
    if not args.skip_baseline:
        s, m = results[("streamed", sizes[1])], results[("in memory", sizes[1])]
        print(f"\nat {sizes[1]:,} concessions, streamed / in memory: time {s['seconds'] / m['seconds']:.2f}x, peak memory {s['peak_gb'] / m['peak_gb']:.2f}x")  # fmt: skip
    print(json.dumps({f"{v}@{n}": r for (v, n), r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
