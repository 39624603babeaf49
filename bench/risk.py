"""Benchmark: the risk SQL over many generated sites and concessions; is it linear?

Generates a region of 10 x 10 degrees with N small ASM site polygons (50-300 m squares),
a tenth of them new this period, plus 10,000 concessions (1-5 km, fixed), 20
protected areas, 20 indigenous lands, 1,000 settlements and 1,000 grievances. They are
written the way the assets write them (GeoParquet plus catalog views). Each risk query
(`pipelines.stages.risk.compute`) then runs with a tenth of the sites and with all of them. Printed:
seconds per query, and the ratio of the two times next to the 10x that linear scaling
would give (a quadratic join would show about 100x).

Run: ``.venv/bin/python bench/risk.py --sites 1000000`` (the issue's size; several
minutes on 2 cores), or ``--sites 100000`` for a quick look.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.regions import parse_regions  # noqa: E402
from pipelines.stages.catalog import refresh_views  # noqa: E402
from pipelines.stages.risk import TABLES, compute  # noqa: E402

BBOX = (-75.0, -15.0, -65.0, -5.0)  # about 1.2 million km2 of the western Amazon


def squares(rng: np.random.Generator, n: int, lo_m: float, hi_m: float) -> list:
    import shapely

    w, s, e, n_ = BBOX
    x = rng.uniform(w, e, n)
    y = rng.uniform(s, n_, n)
    size = rng.uniform(lo_m, hi_m, n) / 111_000.0
    return list(shapely.box(x, y, x + size, y + size))


def write_world(root: Path, region_id: str, n_sites: int, n_concessions: int, seed: int) -> None:
    import geopandas as gpd
    import shapely

    from pipelines.infra.layout import change_path, context_table_path, sites_path
    from pipelines.stages.context import COLUMNS as CTX
    from pipelines.stages.sites import COLUMNS, conform

    rng = np.random.default_rng(seed)
    for period, count in (("2019", int(n_sites * 0.9)), ("2020", n_sites)):
        geoms = squares(rng, count, 50, 300)
        area = [g.area * 111_000**2 / 1e4 for g in geoms]
        f = gpd.GeoDataFrame(
            {"site_id": [f"s{period}-{i}" for i in range(count)], "region": region_id,
             "period": period, "area_ha": area, "mean_probability": 0.8,
             "mapped_area_ha": np.nan, "first_seen_period": None, "source": "bench"},
            geometry=geoms, crs=4326,
        )  # fmt: skip
        path = sites_path(root, region_id, period)
        path.parent.mkdir(parents=True, exist_ok=True)
        conform(f[list(COLUMNS)]).to_parquet(path, write_covering_bbox=True, index=False)
        new = f.iloc[: count // 10]
        change = gpd.GeoDataFrame(
            {"change_id": [f"c{period}-{i}" for i in range(len(new))], "region": region_id,
             "period": period, "kind": "new", "area_ha": new["area_ha"].to_numpy(),
             "first_seen_period": period, "site_id": new["site_id"].to_numpy(), "mean_ndvi": np.nan},
            geometry=list(new.geometry), crs=4326,
        )  # fmt: skip
        path = change_path(root, region_id, period)
        path.parent.mkdir(parents=True, exist_ok=True)
        change.to_parquet(path, write_covering_bbox=True, index=False)

    def layer(kind: str, geoms: list) -> None:
        n = len(geoms)
        f = gpd.GeoDataFrame(
            {"region": region_id, "layer": kind, "feature_id": [f"{kind}-{i}" for i in range(n)],
             "name": [f"{kind} {i}" for i in range(n)], "category": None, "area_ha": None,
             "holder": None, "status": "open", "population": None, "date": None, "place": None,
             "concession_id": None, "attributes": "{}", "source_file": "bench"},
            geometry=geoms, crs=4326,
        )  # fmt: skip
        path = context_table_path(root, region_id, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        f[list(CTX)].to_parquet(path, write_covering_bbox=True, index=False)

    layer("concessions", squares(rng, n_concessions, 1000, 5000))
    layer("protected_areas", squares(rng, 20, 10_000, 30_000))
    layer("indigenous_lands", squares(rng, 20, 5_000, 15_000))
    w, s, e, n_ = BBOX
    points = lambda k: list(shapely.points(rng.uniform(w, e, k), rng.uniform(s, n_, k)))  # noqa: E731
    layer("settlements", points(1000))
    layer("grievances", points(1000))
    refresh_views(root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=1_000_000)
    ap.add_argument("--concessions", type=int, default=10_000)
    ap.add_argument("--tables", default=",".join(TABLES))
    args = ap.parse_args()
    doc = {"regions": [{"id": "bench", "aoi": {"bbox": list(BBOX)}, "periods": [2019, 2020]}]}
    region = parse_regions(doc).regions[0]
    sizes = (args.sites // 10, args.sites)
    times: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = Path(tmp) / str(n)
            t = time.perf_counter()
            write_world(root, "bench", n, args.concessions, seed=n)
            print(f"{n:>9,} sites, {args.concessions:>6,} concessions written in {time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
            for table in args.tables.split(","):
                t = time.perf_counter()
                rows = compute(root, table, region, "2020").num_rows
                times[(table, n)] = time.perf_counter() - t
                print(f"  {table:24} {times[(table, n)]:8.2f} s  {rows:>9,} rows", flush=True)
    print(f"\n{'table':24} {sizes[0]:>10,} {sizes[1]:>10,}  ratio (linear 10x, quadratic 100x)")
    for table in args.tables.split(","):
        a, b = times[(table, sizes[0])], times[(table, sizes[1])]
        print(f"{table:24} {a:9.2f}s {b:9.2f}s  {b / a:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
