"""Benchmark: tiled U-Net inference on a GPU dask worker, routed there by resources.

A dask scheduler, one CPU worker and one GPU worker (`dask worker --resources GPU=1`) run
as separate processes on 127.0.0.1; a full Sentinel-2 tile of features (10980 x 10980 x
9, float16) is made on the GPU worker and `ml.infer.predict_tiled` runs there through
`client.submit(..., resources={"GPU": 1})`. The same call in this process is the
baseline: the ratio is what running on a worker costs. CUDA only (exits 2 without it).
Run: ``python bench/gpu_worker.py [--size 10980] [--compile default] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def infer_once(size: int, compile_mode: str, repeats: int) -> dict[str, Any]:
    """Build the model and a scene where this runs, warm up, time ``repeats`` runs."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))  # also inside a worker process
    from probability import scene  # the same synthetic scene as bench/probability.py

    from ml import infer
    from ml.models import UnetSpec, build_unet

    torch.manual_seed(0)
    model = build_unet(UnetSpec()).eval()
    x, norm = scene(size, pinned=True, dtype="float16")

    def run() -> Any:
        return infer.predict_tiled(
            model, x, normalizer=norm, tile=2048, overlap=32, batch=6,
            device=torch.device("cuda"), dtype="float16", compile=compile_mode or False,
        )  # fmt: skip

    t = time.perf_counter()
    out = run()
    warm = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    return {
        "pid": os.getpid(), "gpu": torch.cuda.get_device_name(0), "warm_s": round(warm, 2),
        "seconds": round(sec, 4), "mpx_s": round(size**2 / 1e6 / sec, 1),
        "mean_p": float(np.nanmean(out[..., ::97, ::97])),
    }  # fmt: skip


def main() -> int:
    import torch
    from cluster import ProcessCluster
    from distributed import Client

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10980)
    ap.add_argument("--compile", default="default", help="'' for eager")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU machine")
        return 2
    here = infer_once(args.size, args.compile, args.repeats)
    print(f"in this process (pid {here['pid']}): {here}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, ProcessCluster(Path(tmp), memory_limit="32GiB") as cluster:  # fmt: skip
        client = Client(scheduler_file=str(cluster.file), timeout="60s")
        cluster.add_worker(client, extra=("--resources", "CPU=1"))
        cluster.add_worker(client, extra=("--resources", "GPU=1"))
        gpu_workers = [a for a, w in client.scheduler_info()["workers"].items() if w.get("resources", {}).get("GPU")]  # fmt: skip
        future = client.submit(infer_once, args.size, args.compile, args.repeats, resources={"GPU": 1}, pure=False)  # fmt: skip
        there = future.result()
        who = client.who_has(future)
        print(f"on the GPU worker {gpu_workers} (pid {there['pid']}): {there}", flush=True)
        ran_on = {a for addrs in who.values() for a in addrs}
        client.close()
    print(f"ran on the GPU worker: {ran_on <= set(gpu_workers)}; worker / in-process throughput: {there['mpx_s'] / here['mpx_s']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
