"""Benchmark: every raster stage at 1x, 16x and 256x the demo's area, peak memory per process.

Takes a data root where `asmwatch demo` has run (``--root``, default ``$ASMWATCH_DATA`` or
``./data``). A region of k times the demo's area is the demo's composites (and truth)
repeated sqrt(k) x sqrt(k) times as a GDAL VRT mosaic on one UTM grid, so no stage can
tell it from one large composite; the stages then run as the assets run them, each in a
fresh process with its own dask LocalCluster (2 workers x 1 thread, 4 GiB each):

- ``probability``: ``map_probability`` with the registered U-Net, tiles of 2048 px;
- ``sites``: ``sites_table`` on that probability, same tiles, written as ``asm_sites`` writes it;
- ``change``: ``change_table`` of 2021 against 2020 with the NDVI of the 2021 composite,
  from and to GeoParquet as ``asm_change`` runs it (its summary and the catalog
  written after it, untimed);
- ``train``: one epoch of ``train_unet`` on chips read from the 2020 mosaic (the
  normaliser's window sample, validation windows);
- ``report``: ``make_reports`` of the region (expansion map, web map, region report)
  from those tables, the backdrop read from the composites' overviews;
- ``probability-whole`` / ``sites-whole``: the same two stages as one tile in one process
  (the whole-raster path these stages had before), for seconds per Mpx and memory;
- ``probability-inproc`` / ``sites-inproc``: the tiled stages without a cluster (tiles
  one after another in the stage's process, torch on both cores);
- ``simulate``: the embedded simulator writing a world of k times the demo's area (or
  ``--km`` km square) around the demo's centre, one period of ``--scenes`` scenes;
- ``composite``: ``build_composite`` of that world's scenes on the LocalCluster.

A sampler thread reads the resident memory of the stage's process and of every process
under it (dask nanny and workers) every 0.1 s: ``peak`` is the largest single process,
``sum`` the largest total. The composite stage streams blocks on dask already and has its
own bench for a full tile of 20 scenes (bench/composite_memory.py); bench/report.py
measures the report with a million grievances.

    .venv/bin/python bench/scale.py                  # 1x, 16x, 256x
    .venv/bin/python bench/scale.py --sizes 400 --stages probability   # U-Net on 110 Mpx
    .venv/bin/python bench/scale.py --west-africa    # 905 Mpx, index baseline: probability, sites
    .venv/bin/python bench/scale.py --stages simulate composite           # simulated worlds
    .venv/bin/python bench/scale.py --stages simulate --km 100            # 100 x 100 km

Targets (issue 16): every process <= 4 GiB at every size; peak at 256x within 1.3x of
16x; seconds per Mpx of the tiled stages no worse than the whole-raster path.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REGION = "demo-huepetuhe"
FEATURES = ("B02", "B03", "B04", "B08", "B11", "B12", "NDVI", "MNDWI", "BSI")
WEST_AFRICA_MPX = 905


def mosaic(src_path: Path, target: Path, nx: int, ny: int, bands: tuple[str, ...] | None) -> Path:
    """A VRT repeating ``src_path`` nx x ny times on its grid (band names kept)."""
    import rasterio

    with rasterio.open(src_path) as src:
        w, h, t = src.width, src.height, src.transform
        names = list(src.descriptions)
        dtype = {"float32": "Float32", "uint8": "Byte"}[src.dtypes[0]]
        nodata = src.nodata
        crs = src.crs.to_wkt()
    idx = [names.index(b) + 1 for b in bands] if bands else list(range(1, len(names) + 1))
    out = [
        f'<VRTDataset rasterXSize="{w * nx}" rasterYSize="{h * ny}">',
        f"<SRS>{escape(crs)}</SRS>",
        f"<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>",
    ]
    for k, i in enumerate(idx, start=1):
        out.append(f'<VRTRasterBand dataType="{dtype}" band="{k}">')
        if names[i - 1]:
            out.append(f"<Description>{names[i - 1]}</Description>")
        if nodata is not None:
            out.append(f"<NoDataValue>{'nan' if math.isnan(nodata) else nodata}</NoDataValue>")
        for row in range(ny):
            for col in range(nx):
                out.append(
                    f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(src_path))}'
                    f"</SourceFilename><SourceBand>{i}</SourceBand>"
                    f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                    f'<DstRect xOff="{col * w}" yOff="{row * h}" xSize="{w}" ySize="{h}"/>'
                    "</SimpleSource>"
                )
        out.append("</VRTRasterBand>")
    out.append("</VRTDataset>")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(out))
    return target


def scaled_root(demo: Path, work: Path, k: float) -> tuple[Path, Any, float]:
    """A data root for a region of ``k`` x the demo's area: (root, region, Mpx)."""
    import shutil

    from pyproj import Transformer

    from pipelines.regions import parse_regions

    n = max(1, math.ceil(math.sqrt(k) - 1e-9))
    nx, ny = n, max(1, math.ceil(k / n - 1e-9))
    root = work / f"x{round(k)}"
    region_id = f"scale-{round(k)}"
    for period in ("2020", "2021"):
        mosaic(
            demo / "composite" / REGION / f"{period}.tif",
            root / "composite" / region_id / f"{period}.tif", nx, ny, None,
        )  # fmt: skip
        mosaic(
            demo / "embedded" / REGION / "truth" / f"{period}.tif",
            root / "truth" / f"{period}.tif", nx, ny, None,
        )  # fmt: skip
    if not (root / "models").exists():
        shutil.copytree(demo / "models", root / "models")
    import rasterio

    with rasterio.open(root / "composite" / region_id / "2021.tif") as src:
        left, bottom, right, top = src.bounds
        mpx = src.width * src.height / 1e6
        to_ll = Transformer.from_crs(src.crs, 4326, always_xy=True)
    (w, s), (e, nn) = to_ll.transform(left, bottom), to_ll.transform(right, top)
    region = parse_regions(
        {"regions": [{"id": region_id, "aoi": {"bbox": [w, s, e, nn]}, "periods": [2020, 2021]}]}
    ).regions[0]
    return root, region, mpx


def simulated_region(k: float, km: float | None, scenes: int) -> tuple[Any, float]:
    """An embedded region of ``k`` x the demo's area (or ``km`` x ``km``) around the
    demo's centre, one period (2021) of ``scenes`` acquisitions: (region, Mpx)."""
    import dataclasses

    from pipelines.embedded.simulator.world import MARGIN_M
    from pipelines.infra.grid import window_for_bbox
    from pipelines.regions import EmbeddedSpec, load_regions

    demo = load_regions(ROOT / "regions.yaml").get(REGION)
    w, s, e, n = demo.bbox
    cx, cy = (w + e) / 2, (s + n) / 2
    if km:
        hx = km / 2 / (111.32 * math.cos(math.radians(cy)))
        hy = km / 2 / 110.57
    else:
        hx, hy = (e - w) / 2 * math.sqrt(k), (n - s) / 2 * math.sqrt(k)
    bbox = (cx - hx, cy - hy, cx + hx, cy + hy)
    ring = [[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]], [bbox[0], bbox[3]]]
    region = dataclasses.replace(
        demo,
        id=f"sim-{km:g}km" if km else f"sim-{k:g}x",
        bbox=bbox,
        geometry={"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        periods=tuple(p for p in demo.periods if p.id == "2021"),
        embedded=EmbeddedSpec(seed=42, scenes_per_period=scenes, reprocessed_twins=False),
    )
    win = window_for_bbox(bbox, 10.0, margin_m=MARGIN_M)
    return region, win.width * win.height / 1e6


# --------------------------------------------------------------------------- stages


def _client() -> Any:
    from distributed import Client, LocalCluster

    from pipelines.infra.tiling import worker_environ

    with worker_environ():
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, memory_limit="4GiB", processes=True,
            host="127.0.0.1", dashboard_address=None, scheduler_kwargs={"dashboard": False},
        )  # fmt: skip
    return Client(cluster)


def _stage(
    name: str,
    root: str,
    region: Any,
    baseline: bool,
    out: Any,
    periods: tuple[str, ...] = ("2020", "2021"),
) -> None:
    from ml import registry
    from pipelines.infra.layout import probability_path, sites_path
    from pipelines.stages.detection import map_probability
    from pipelines.stages.sites import extract_sites, sites_table

    root_p = Path(root)
    if name in ("simulate", "composite"):
        out.put(_world_stage(name, root_p, region))
        return
    whole = name.endswith("-whole")
    tile = 1 << 20 if whole else int(os.environ.get("ASMWATCH_BENCH_TILE", "0"))  # whole: one tile
    extra: dict[str, Any] = {}
    client = None
    device = os.environ.get("ASMWATCH_BENCH_DEVICE", "cpu")
    inproc = name.endswith("-inproc")  # tiles in this process, no cluster
    if not whole and not inproc and name.startswith(("probability", "sites")) and device == "cpu":
        t = time.perf_counter()
        client = _client()  # started once per Dagster step too; timed apart
        client.wait_for_workers(2)
        extra["cluster_s"] = round(time.perf_counter() - t, 1)
    untimed = 0.0
    started = time.perf_counter()
    if name.startswith("probability"):
        record = None if baseline else registry.latest(root_p)
        for period in ("2021",) if whole else periods:
            res = map_probability(
                root_p, region, period, record=record, device=device, tile_px=tile,
                client=client, progress=lambda _m: None,
            )  # fmt: skip
            extra |= {"tiles": res.tiles, "detector": res.detector}
    elif name.startswith("sites"):
        for period in ("2021",) if whole else periods:
            src = probability_path(root_p, region.id, period)
            if whole:  # the whole-raster path gave a frame
                count = len(extract_sites(src, region.id, period, tile_px=tile))
            else:
                count = sites_table(
                    src, region.id, period, sites_path(root_p, region.id, period),
                    tile_px=tile, client=client,
                ).count  # fmt: skip
            extra |= {"sites": count}
    elif name == "change":
        from pipelines.infra.layout import change_path, composite_path
        from pipelines.stages.catalog import refresh_views
        from pipelines.stages.change import change_table, mining_ha, summarise, write_summary

        prev_sites = sites_path(root_p, region.id, "2020")
        changed = change_table(
            region, "2021", sites_path(root_p, region.id, "2021"), prev_sites,
            change_path(root_p, region.id, "2021"),
            composite=composite_path(root_p, region.id, "2021"),
        )  # fmt: skip
        extra = {"rows": changed.rows, "sites": changed.summary["site_count"]}
        t = time.perf_counter()  # the summary and catalog, as the asset writes them
        summary = summarise(changed.summary, mining_ha(prev_sites), None)
        write_summary(summary, root_p, region.id, "2021")
        refresh_views(root_p)
        untimed = time.perf_counter() - t
    elif name == "report":
        from pipelines.stages.reports import make_reports

        reports = make_reports(root_p, region, say=lambda _m: None)
        extra = {
            "webmap_mb": round(reports.webmap_html.stat().st_size / 1e6, 2),
            "report_mb": round(reports.report_html.stat().st_size / 1e6, 2),
        }
    elif name == "train":
        from ml.train import TrainConfig, train_unet
        from pipelines.infra.layout import composite_path
        from pipelines.stages.detection import (
            CompositeChips,
            TrainingScene,
            fit_normalizer,
            validation_windows,
        )

        scene = TrainingScene(
            region.id, "2020", composite_path(root_p, region.id, "2020"),
            root_p / "truth" / "2020.tif", heldout=False,
        )  # fmt: skip
        norm = fit_normalizer([scene], 42)
        chips = CompositeChips(scene, norm)
        val = validation_windows(scene, norm)
        cfg = TrainConfig(max_epochs=1, patience=1)
        train_unet([chips], val, cfg, progress=lambda _m: None)
        chips.close()
        extra = {"val_windows": len(val)}
    seconds = time.perf_counter() - started - untimed
    if client is not None:
        client.close()
    cpu = os.times()
    extra["own_cpu_s"] = round(cpu.user + cpu.system, 1)  # this process, start-up included
    out.put({"seconds": seconds, **extra})


def _world_stage(name: str, world: Path, region: Any) -> dict[str, Any]:
    """``simulate``: the embedded world of ``region`` into ``world``; ``composite``: its
    composite on a LocalCluster (the scenes read as the composite asset reads them)."""
    if name == "simulate":
        from pipelines.embedded.simulator import simulate_world

        started = time.perf_counter()
        info = simulate_world(region, world)
        return {"seconds": time.perf_counter() - started, "scenes": len(info.items)}
    from pipelines.embedded.simulator import load_items
    from pipelines.stages.composite import build_composite, region_geobox

    t = time.perf_counter()
    client = _client()
    client.wait_for_workers(2)
    cluster_s = round(time.perf_counter() - t, 1)
    items = [i for i in load_items(world) if i["id"].endswith("_0_L2A")]
    started = time.perf_counter()
    res = build_composite(
        items, region_geobox(region), world.parent / f"{world.name}-composite.tif",
        region=region.id, period="2021", aoi=region.geometry, client=client,
        progress=lambda _m: None,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    cluster = client.cluster
    client.close()
    cluster.close()
    return {"seconds": seconds, "cluster_s": cluster_s, "scenes": len(items),
            "valid": round(res.valid_fraction, 3)}  # fmt: skip


def measure(
    name: str,
    root: Path,
    region: Any,
    baseline: bool = False,
    periods: tuple[str, ...] = ("2020", "2021"),
) -> dict[str, Any]:
    """Run one stage in a fresh process; its time and the peak memory of its processes."""
    import psutil

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_stage, args=(name, str(root), region, baseline, q, periods))
    proc.start()
    peaks: dict[int, int] = {}
    total = [0]
    stop = threading.Event()

    def sample() -> None:
        try:
            top = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            s = 0
            try:
                for p in [top, *top.children(recursive=True)]:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
                    s += rss
            except psutil.Error:
                pass
            total[0] = max(total[0], s)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    proc.join()
    stop.set()
    t.join()
    if proc.exitcode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.exitcode})")
    result = q.get()
    result["peak_gib"] = max(peaks.values()) / 2**30 if peaks else float("nan")
    result["own_gib"] = round(peaks.get(proc.pid or 0, 0) / 2**30, 2)  # the stage's process
    result["sum_gib"] = total[0] / 2**30
    result["processes"] = len(peaks)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("ASMWATCH_DATA", "data")))
    ap.add_argument("--sizes", type=float, nargs="*", default=[1, 16, 256])
    ap.add_argument(
        "--stages", nargs="*",
        default=["probability", "probability-whole", "sites", "sites-whole", "change", "train", "report"],
    )  # fmt: skip
    ap.add_argument("--west-africa", action="store_true", help="905 Mpx, index baseline")
    ap.add_argument(
        "--km", type=float, nargs="*", default=[],
        help="simulate/composite: square regions this many km across (instead of --sizes)",
    )  # fmt: skip
    ap.add_argument("--scenes", type=int, default=2, help="simulate/composite: scenes per period")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--one-period", action="store_true", help="probability and sites of 2021 only")
    ap.add_argument("--tile-px", type=int, default=0, help="processing tile edge (0: the default)")
    ap.add_argument(
        "--device", default="cpu",
        help="cuda: the probability stage on the GPU, in the stage's process (a full 10980 px "
        "tile is --sizes 441: the demo composite 21 x 21 times, 122 Mpx)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    demo = args.root.resolve()
    os.environ["ASMWATCH_BENCH_TILE"] = str(args.tile_px)  # read by the stage processes
    os.environ["ASMWATCH_BENCH_DEVICE"] = args.device
    only_worlds = set(args.stages) <= {"simulate", "composite"} and not args.west_africa
    if not only_worlds and not (demo / "composite" / REGION / "2021.tif").exists():
        print(f"no demo run under {demo}: run `make demo` first (or pass --root)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="asmwatch-scale-"))
    demo_mpx = None
    sizes = args.sizes
    stages = args.stages
    baseline = False
    if args.west_africa:
        import rasterio

        with rasterio.open(demo / "composite" / REGION / "2021.tif") as src:
            demo_mpx = src.width * src.height / 1e6
        sizes = [WEST_AFRICA_MPX / demo_mpx]
        stages = ["probability", "sites"]
        baseline = True
    print(f"{'size':>6} {'Mpx':>6} {'stage':>18} {'seconds':>8} {'s/Mpx':>7} {'peak GiB':>9} {'sum GiB':>8} {'procs':>5}  notes")  # fmt: skip
    world_stages = [s for s in stages if s in ("simulate", "composite")]
    for km in args.km if world_stages else []:
        region, mpx = simulated_region(0, km, args.scenes)
        for stage in world_stages:
            r = measure(stage, work / region.id, region)
            _report(f"{km:g}km", mpx, stage, r, r["seconds"] / mpx)
    for k in sizes if not args.km else []:
        if world_stages:
            region, mpx = simulated_region(k, None, args.scenes)
            for stage in world_stages:
                r = measure(stage, work / region.id, region)
                _report(f"{k:g}x", mpx, stage, r, r["seconds"] / mpx)
        raster_stages = [s for s in stages if s not in world_stages]
        if not raster_stages:
            continue
        root, region, mpx = scaled_root(demo, work, k)
        for stage in raster_stages:
            periods = ("2021",) if args.one_period else ("2020", "2021")
            r = measure(stage, root, region, baseline, periods)
            per = r["seconds"] / (mpx * (len(periods) if stage in ("probability", "sites") else 1))
            _report(f"{k:g}x", mpx, stage, r, per)
    return 0


def _report(size: str, mpx: float, stage: str, r: dict[str, Any], per: float) -> None:
    notes = ", ".join(f"{key} {v}" for key, v in r.items() if key not in ("seconds", "peak_gib", "sum_gib", "processes"))  # fmt: skip
    print(
        f"{size:>6} {mpx:>6.1f} {stage:>18} {r['seconds']:>8.1f} {per:>7.3f} "
        f"{r['peak_gib']:>9.2f} {r['sum_gib']:>8.2f} {r['processes']:>5}  {notes}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
