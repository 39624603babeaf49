"""Benchmark: the region report with a large grievance log; time linear, memory bounded?

Takes a data root where `asmwatch demo` has run (``--root``, default ``$ASMWATCH_DATA``
or ``./data``), copies it, replaces the demo region's grievance log by N generated
grievances around the region, and times ``pipelines.stages.reports.make_reports`` (map, report,
web map) in a fresh process for N/10 and N, with its peak memory and the web map's size.
Baseline: the same report at N/10 in the same run (linear time is 10x).

Run: ``.venv/bin/python bench/report.py --grievances 1000000`` (the issue's size).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REGION = "demo-huepetuhe"


def write_grievances(root: Path, n: int, seed: int = 3) -> None:
    import datetime as dt

    import geopandas as gpd
    import shapely

    from pipelines.infra.layout import context_table_path
    from pipelines.regions import load_regions
    from pipelines.stages.catalog import refresh_views
    from pipelines.stages.context import COLUMNS

    region = load_regions(ROOT / "regions.yaml").get(REGION)
    w, s, e, north = region.bbox
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(w - 0.05, e + 0.05, n), rng.uniform(s - 0.05, north + 0.05, n)
    days = rng.integers(0, 3 * 365, n)
    frame = gpd.GeoDataFrame(
        {"region": REGION, "layer": "grievances", "feature_id": [f"G-{i:07d}" for i in range(n)],
         "name": None, "category": rng.choice(["water", "land", "violence", "noise"], n),
         "area_ha": np.nan, "holder": None, "status": rng.choice(["open", "closed"], n),
         "population": np.nan,
         "date": [dt.date(2019, 1, 1) + dt.timedelta(days=int(d)) for d in days],
         "place": None, "concession_id": None, "attributes": "{}", "source_file": "bench"},
        geometry=list(shapely.points(x, y)), crs=4326,
    )  # fmt: skip
    for col in ("region", "layer", "feature_id", "name", "category", "holder", "status", "place", "concession_id", "attributes", "source_file"):  # fmt: skip
        frame[col] = frame[col].astype("string")
    frame[list(COLUMNS)].to_parquet(context_table_path(root, REGION, "grievances"), write_covering_bbox=True, index=False)  # fmt: skip
    refresh_views(root)


def write_change(root: Path, n: int, period: str = "2021", seed: int = 4) -> None:
    """Replace the demo region's change rows of ``period`` by ``n`` small mining areas
    (squares of 20-60 m over the region, half of them first seen that period), written
    with DuckDB: a region with ``n`` sites as the web map and the report meet it."""
    from pipelines.infra.layout import change_path
    from pipelines.regions import load_regions
    from pipelines.stages.catalog import connect, refresh_views

    region = load_regions(ROOT / "regions.yaml").get(REGION)
    w, s, e, north = region.bbox
    target = change_path(root, REGION, period)
    con = connect(root / "scratch.duckdb")
    try:
        con.execute(
            f"""COPY (
              SELECT '{REGION}-{period}-new-' || i AS change_id, '{REGION}' AS region,
                     '{period}' AS period, CASE WHEN i % 2 = 0 THEN 'new' ELSE 'stable' END AS kind,
                     side * side / 1e4 * 1e-4 * 1.2e6 AS area_ha,
                     CASE WHEN i % 2 = 0 THEN '{period}' ELSE '2019' END AS first_seen_period,
                     NULL::VARCHAR AS site_id, NULL::DOUBLE AS mean_ndvi,
                     ST_SetCRS(ST_MakeEnvelope(x, y, x + side, y + side), 'EPSG:4326') AS geometry
              FROM (SELECT i, {w} + hash(i, {seed}) % 1000000 / 1e6 * {e - w} AS x,
                           {s} + hash(i, {seed} + 1) % 1000000 / 1e6 * {north - s} AS y,
                           (20 + hash(i, {seed} + 2) % 40) * 9e-6 AS side
                    FROM range({n}) t(i))
            ) TO '{target}' (FORMAT parquet)"""
        )
    finally:
        con.close()
        (root / "scratch.duckdb").unlink(missing_ok=True)
    refresh_views(root)


def _run(root: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from pipelines.regions import load_regions
    from pipelines.stages.reports import make_reports

    region = load_regions(ROOT / "regions.yaml").get(REGION)
    t = time.perf_counter()
    reports = make_reports(Path(root), region, say=lambda _m: None)
    seconds = time.perf_counter() - t
    out.put({
        "seconds": seconds,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "webmap_mb": reports.webmap_html.stat().st_size / 1e6,
        "report_mb": reports.report_html.stat().st_size / 1e6,
    })  # fmt: skip


def measure(root: Path) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    p = ctx.Process(target=_run, args=(str(root), q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"seconds": float("nan"), "peak_gb": float("nan"), "webmap_mb": float("nan"), "report_mb": float("nan")}  # fmt: skip
    return dict(q.get())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grievances", type=int, default=1_000_000)
    ap.add_argument("--root", default=os.environ.get("ASMWATCH_DATA", "data"), help="a data root where `asmwatch demo` has run")  # fmt: skip
    args = ap.parse_args()
    src = Path(args.root).resolve()
    if not (src / "summary" / REGION).is_dir():
        print(f"{src} has no demo run: run `make demo` (or pass --root)", file=sys.stderr)
        return 2
    sizes = (args.grievances // 10, args.grievances)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = Path(tmp) / str(n)
            shutil.copytree(src, root, symlinks=True, ignore=shutil.ignore_patterns("dagster_home", "embedded"))  # fmt: skip
            shutil.copytree(src / "embedded" / REGION / "context", root / "embedded" / REGION / "context")  # fmt: skip
            write_grievances(root, n)
            r = results[n] = measure(root)
            print(f"{n:>9,} grievances  {r['seconds']:7.2f} s  peak {r['peak_gb']:5.2f} GB  web map {r['webmap_mb']:7.1f} MB  report {r['report_mb']:5.2f} MB", flush=True)  # fmt: skip
    a, b = results[sizes[0]], results[sizes[1]]
    print(f"\nN / (N/10): time {b['seconds'] / a['seconds']:.1f}x (linear 10x), peak memory {b['peak_gb'] / a['peak_gb']:.2f}x, web map {b['webmap_mb'] / a['webmap_mb']:.2f}x")  # fmt: skip
    print(json.dumps({str(k): v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
