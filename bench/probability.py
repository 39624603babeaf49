"""Benchmark: end-to-end throughput of `mining_probability`'s tiled inference.

A composite's nine feature bands (10980 x 10980 px by default, a full Sentinel-2 tile)
are already in host memory as raw features with NaN holes, the way ``read_composite``
leaves them: for the shipped variant in page-locked memory as float16, as
``mining_probability`` reads them on a GPU (``read_composite(pinned=True,
dtype=float16)``); other variants hold float32 or ordinary memory. The timed call is ``ml.infer.predict_tiled``
with the shipped U-Net architecture (``ml.models.UnetSpec``; random weights, speed does
not depend on them) and the model's normaliser: host-to-device copies, normalisation,
tiling, overlap, batched forward passes, blending, stitching, NaN masking and the copy
back into host memory. Writing the COG is not included.

Baseline in the same process: the model alone (the same prepared and maybe compiled step)
on ready-made device batches of the same tile shape, as many pixels as the tiles cover,
no tiling or transfers; ``end to end / model alone`` shows what the pipeline around the
model costs. Also printed: the host-to-device copy rate from pinned and from ordinary
memory (the floor the upload sets), and how far each variant's output is from a float32
eager run on the same scene.

Run on the GPU machine: ``python bench/probability.py`` (CUDA when present; variants
with ``--variants``). On CPU use a smaller scene: ``--size 1024 --variants cpu``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ml.infer as infer  # noqa: E402
from ml.features import FEATURE_BANDS, Normalizer  # noqa: E402
from ml.models import UnetSpec, build_unet  # noqa: E402

# name: (tile, batch, model dtype, compile mode, pinned input, input dtype in host memory)
Variant = tuple[int | tuple[int, int], int, str, str, bool, str]
VARIANTS: dict[str, Variant] = {
    "eager": (2048, 6, "float16", "", True, "float16"),
    "default": (2048, 6, "float16", "default", True, "float16"),
    "f32host": (2048, 6, "float16", "default", True, "float32"),
    "bf16": (2048, 6, "bfloat16", "default", True, "float16"),
    "shipped": (2048, 6, "float16", "max-autotune-no-cudagraphs", True, "float16"),
    "tile1024": (1024, 12, "float16", "default", True, "float16"),
    "strips": ((2048, 11008), 1, "float16", "default", True, "float16"),
    "pageable": (2048, 6, "float16", "default", False, "float16"),
    "cpu": (256, 16, "float32", "", False, "float32"),
}


def scene(size: int, pinned: bool, dtype: str) -> tuple[np.ndarray, Normalizer]:
    """Raw-looking features: reflectances 0.02-0.4, indices in [-1, 1], a NaN hole."""
    rng = np.random.default_rng(0)
    c = len(FEATURE_BANDS)
    shape = (c, size, size)
    x = infer.pinned_empty(shape, dtype) if pinned else np.empty(shape, dtype)
    for i in range(c):
        lo, hi = (0.02, 0.4) if i < 6 else (-1.0, 1.0)
        x[i] = rng.uniform(lo, hi, (size, size)).astype(np.float32)
    x[:, : size // 20, : size // 20] = np.nan  # an unobserved corner
    norm = Normalizer(tuple([0.2] * 6 + [0.0] * 3), tuple([0.1] * 6 + [0.5] * 3))
    return x, norm


def copy_rate(x: np.ndarray, device: torch.device) -> float:
    """GB/s of one whole host-to-device copy."""
    src = torch.from_numpy(x)
    dst = torch.empty(src.shape, dtype=src.dtype, device=device)
    dst.copy_(src)  # warm
    torch.cuda.synchronize()
    t = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return x.nbytes / (time.perf_counter() - t) / 1e9


def variant(
    name: str, model: torch.nn.Module, inputs: dict[tuple[bool, str], tuple[np.ndarray, Normalizer]],
    reference: np.ndarray | None, device: torch.device, size: int, overlap: int, repeats: int,
) -> tuple[Any, ...]:  # fmt: skip
    """Warm up, then time one variant end to end and its model alone; print a line."""
    mpx = size**2 / 1e6
    tile, batch, dtype, compiled, pinned, host = VARIANTS[name]
    dev = torch.device("cpu") if name == "cpu" else device
    x, norm = inputs[(pinned, host)]
    plan = infer.plan_tiles(size, size, tile, overlap)

    def run() -> np.ndarray:
        return infer.predict_tiled(
            model, x, normalizer=norm, tile=tile, overlap=overlap, batch=batch,
            device=dev, dtype=dtype, compile=compiled,
        )  # fmt: skip

    t = time.perf_counter()
    out = run()  # warm-up: compilation, cuDNN autotuning, allocator
    warm = time.perf_counter() - t
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    e2e = float(np.median(times))
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0

    # The model alone: same step, same tile shape, ready batches on the device.
    prep = infer.prepared(model, dev, dtype, compiled) if dev.type == "cuda" else None
    n_steps = -(-plan.n_tiles // batch)
    bt = torch.randn(batch, len(FEATURE_BANDS), plan.tile_h, plan.tile_w, device=dev)
    bt = bt.to(torch.float16) if host == "float16" else bt
    ones = torch.ones((len(FEATURE_BANDS), 1, 1), device=dev)

    def alone() -> None:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=True):
            for _ in range(n_steps):
                if prep is not None:
                    prep.step(bt, ones * 0, ones)
                else:
                    torch.sigmoid(model(bt))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    alone()
    t_alone = []
    for _ in range(repeats):
        t = time.perf_counter()
        alone()
        t_alone.append(time.perf_counter() - t)
    model_s = float(np.median(t_alone))
    model_rate = n_steps * batch * plan.tile_h * plan.tile_w / model_s / 1e6
    diff = ""
    if reference is not None and dev.type == "cuda":
        ok = np.isfinite(reference)
        d = np.abs(out[ok] - reference[ok])
        same_nan = bool((np.isnan(out) == ~ok).all())
        diff = f"{d.mean():.1e}/{d.max():.1e}{'' if same_nan else ' NaN MISMATCH'}"
    row = (
        name, f"{plan.n_tiles}x{plan.tile_h}x{plan.tile_w}", batch, dtype, compiled, pinned,
        e2e, mpx / e2e, model_rate, mpx / e2e / model_rate, warm, peak, diff, host,
    )  # fmt: skip
    print(
        f"{name}: {e2e:.3f} s ({min(times):.3f}-{max(times):.3f}) = {mpx / e2e:.0f} Mpx/s "
        f"end to end; model alone {model_rate:.0f} Mpx/s; warm-up {warm:.1f} s; "
        f"peak {peak:.1f} GiB; |out - fp32| mean/max {diff}",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10980, help="scene edge, pixels")
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="eager,default,f32host,bf16,shipped")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    names = [v for v in args.variants.split(",") if v]
    torch.manual_seed(0)
    model = build_unet(UnetSpec()).eval()
    mpx = args.size**2 / 1e6
    print(
        f"torch {torch.__version__}, scene {args.size} x {args.size} ({mpx:.0f} Mpx, "
        f"{len(FEATURE_BANDS)} bands), overlap >= {args.overlap}, on {device}"
        + (f" ({torch.cuda.get_device_name()})" if cuda else ""),
        flush=True,
    )
    keys = {(VARIANTS[n][4], VARIANTS[n][5]) for n in names} | (
        {(True, "float32")} if cuda else set()
    )
    inputs = {k: scene(args.size, *k) for k in sorted(keys)}
    if cuda:
        for (pinned, host), (x, _) in inputs.items():
            print(f"host-to-device copy, {host} in {'pinned' if pinned else 'ordinary'} memory: "
                  f"{copy_rate(x, device):.1f} GB/s ({x.nbytes / 1e9:.2f} GB)", flush=True)  # fmt: skip

    reference = None
    if cuda:  # float32 input and model, eager: what the other variants are compared with
        x, norm = inputs[(True, "float32")]
        reference = infer.predict_tiled(
            model, x, normalizer=norm, tile=2048, overlap=args.overlap, batch=6,
            device=device, dtype="float32",
        )  # fmt: skip

    rows = []
    for n in names:
        try:
            rows.append(
                variant(n, model, inputs, reference, device, args.size, args.overlap, args.repeats)
            )
        except Exception as e:  # one failing variant must not lose the others' figures
            print(f"{n}: FAILED {type(e).__name__}: {e}", flush=True)
    print()
    print(
        f"{'variant':9} {'tiles':16} {'batch':>5} {'dtype':9} {'compile':7} {'input':12} "
        f"{'e2e s':>6} {'e2e Mpx/s':>9} {'model Mpx/s':>11} {'ratio':>5} {'warm s':>6} "
        f"{'GiB':>5}  |p-p32| mean/max"
    )
    for r in rows:
        print(
            f"{r[0]:9} {r[1]:16} {r[2]:5} {r[3]:9} {(r[4] or 'eager')[:7]:7} "
            f"{r[13].replace('float', 'f') + (' pinned' if r[5] else ' pageable'):12} {r[6]:6.3f} "
            f"{r[7]:9.0f} {r[8]:11.0f} {r[9]:5.2f} {r[10]:6.1f} {r[11]:5.1f}  {r[12]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
