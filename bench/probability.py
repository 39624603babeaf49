"""Benchmark: end-to-end throughput of `mining_probability`'s tiled inference.

A composite's nine feature bands (10980 x 10980 px by default, a full Sentinel-2 tile)
are already in host memory as float32; the timed call is ``ml.infer.predict_tiled`` with
the shipped U-Net (``ml.models.UnetSpec``, random weights: speed does not depend on
them): host-to-device copy, tiling, overlap, batched forward passes (bf16 autocast and
channels-last on CUDA), blending, stitching and the copy back. Prints Mpx/s of input,
best of --repeats after one warm-up, and the peak GPU memory. Baseline in the same
process: the model alone on the same number of pixels in ready-made batches, no tiling
or transfers, so the ratio shows what the pipeline around the model costs.

Run on the GPU machine: ``.venv/bin/python bench/probability.py`` (CUDA is used when
present). On CPU use a smaller scene: ``--size 1024``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml.features import FEATURE_BANDS  # noqa: E402
from ml.infer import pick_device, predict_tiled  # noqa: E402
from ml.models import UnetSpec, build_unet  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10980, help="scene edge, pixels")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = pick_device(args.device)
    torch.manual_seed(0)
    model = build_unet(UnetSpec()).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(FEATURE_BANDS), args.size, args.size), dtype=np.float32)
    mpx = args.size * args.size / 1e6
    print(
        f"scene {args.size} x {args.size} ({mpx:.0f} Mpx, {x.nbytes / 2**30:.1f} GiB in host "
        f"memory), tile {args.tile}, overlap {args.overlap}, batch {args.batch}, on {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Baseline: the model alone on ready batches on the device, same pixel count.
    n_tiles = max(1, round(args.size**2 / args.tile**2))
    batch = torch.randn(args.batch, len(FEATURE_BANDS), args.tile, args.tile, device=device)
    m = model.to(device)
    if device.type == "cuda":
        m = m.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)

    def model_only() -> None:
        with torch.no_grad():
            for _ in range(max(1, n_tiles // args.batch)):
                if device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        m(batch)
                else:
                    m(batch)
        sync()

    def end_to_end() -> np.ndarray:
        out = predict_tiled(
            model, x, tile=args.tile, overlap=args.overlap, batch=args.batch, device=device
        )
        sync()
        return out

    results = {}
    for name, fn, px in (
        ("model alone", model_only, max(1, n_tiles // args.batch) * args.batch * args.tile**2),
        ("end to end ", end_to_end, args.size**2),
    ):
        fn()  # warm-up (cuDNN autotune, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        rate = px / best / 1e6
        results[name] = rate
        peak = (
            f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if device.type == "cuda"
            else ""
        )
        print(f"{name}: {best:8.3f} s  {rate:9.1f} Mpx/s{peak}")
    print(f"end to end / model alone: {results['end to end '] / results['model alone']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
