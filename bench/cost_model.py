"""Cost model: one period of the whole Amazon basin (about 6.7 million km2), from the
throughputs measured in this repository (docs/performance.md).

Every input is a flag with the measured figure as its default, so the model is rerun
when a measurement changes. Prints pixels, tiles, CPU-hours for composites, GPU-seconds
for inference, and data volumes.
Run: ``.venv/bin/python bench/cost_model.py [--area-km2 6.7e6] [--scenes 20] ...``.
"""

from __future__ import annotations

import argparse

TILE_KM = 109.8  # a Sentinel-2 MGRS tile: 10980 px at 10 m
TILE_PX = 10980**2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--area-km2", type=float, default=6.7e6, help="area to cover (Amazon basin)")
    ap.add_argument("--tile-overlap", type=float, default=1.2,
                    help="MGRS tiles overlap their neighbours: tiles read per tile of area")  # fmt: skip
    ap.add_argument("--scenes", type=int, default=20, help="scenes per tile and period")
    ap.add_argument("--composite-core-s", type=float, default=2 * 924.0,
                    help="core-seconds per full tile and period (bench/composite_memory.py: 924 s on 2 workers, 20 scenes)")  # fmt: skip
    ap.add_argument("--gpu-mpx-s", type=float, default=1006.0,
                    help="end-to-end inference on one H100, Mpx/s (bench/probability.py, shipped)")  # fmt: skip
    ap.add_argument("--gpu-warmup-s", type=float, default=20.6, help="per GPU process, inductor cache warm")  # fmt: skip
    ap.add_argument("--cpu-mpx-s", type=float, default=0.25,
                    help="inference on 2 CPU cores, Mpx/s (demo: 504 x 548 px in about 1.1 s)")  # fmt: skip
    ap.add_argument("--composite-gb-per-tile", type=float, default=4.62, help="measured float32 COG, 10 bands")  # fmt: skip
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--cores", type=int, default=64, help="CPU cores in the composite cluster")
    a = ap.parse_args()

    tiles = a.area_km2 / TILE_KM**2 * a.tile_overlap
    px = a.area_km2 * 1e4  # 10 m pixels
    core_h = tiles * a.composite_core_s / 3600
    gpu_s = px / 1e6 / a.gpu_mpx_s + a.gpu_warmup_s * a.gpus
    cpu_infer_core_h = px / 1e6 / a.cpu_mpx_s * 2 / 3600
    # Reads per scene, uncompressed upper bound: 4 bands at 10 m (uint16), 2 at 20 m, SCL.
    scene_gb = (4 * TILE_PX * 2 + 2 * (TILE_PX / 4) * 2 + TILE_PX / 4) / 1e9
    rows = [
        ("area", f"{a.area_km2:,.0f} km2 = {px / 1e9:,.1f} Gpx at 10 m"),
        ("tiles read", f"{tiles:,.0f} (area / {TILE_KM} km tile^2 x {a.tile_overlap} overlap)"),
        ("scenes read", f"{tiles * a.scenes:,.0f} ({a.scenes} per tile and period)"),
        (
            "input volume",
            f"{tiles * a.scenes * scene_gb / 1e3:,.1f} TB at most ({scene_gb:.2f} GB per scene uncompressed: B02 B03 B04 B08, B11 B12, SCL; deflated COGs are smaller)",
        ),
        (
            "composite CPU",
            f"{core_h:,.0f} core-hours = {core_h / a.cores:,.1f} h on {a.cores} cores (I/O-bound; scales with workers, bench/scaleout.py)",
        ),
        (
            "inference GPU",
            f"{gpu_s:,.0f} GPU-seconds on {a.gpus} H100 ({px / 1e6:,.0f} Mpx at {a.gpu_mpx_s:,.0f} Mpx/s + {a.gpu_warmup_s} s warm-up per GPU)",
        ),
        (
            "inference CPU instead",
            f"{cpu_infer_core_h:,.0f} core-hours at {a.cpu_mpx_s} Mpx/s per 2 cores",
        ),
        (
            "composites written",
            f"{tiles * a.composite_gb_per_tile / 1e3:,.2f} TB ({a.composite_gb_per_tile} GB per tile)",
        ),
        ("probability written", f"{px * 4 / 1e12:,.2f} TB at most (float32, before deflate)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
