"""Benchmark: the U-Net alone on one GPU batch, step by step (what each change is worth).

Runs the shipped architecture on 6 x 9 x 1888 x 1888 (one row of tiles of a full
Sentinel-2 tile) in fp16 and bf16, eager and compiled (inductor, frozen weights), with
the first convolution taking the 9 feature bands as they are or padded to 16 channels,
and finally fp16 with max-autotune. Prints milliseconds per batch and Mpx/s; the
eager fp16 run is the baseline. Needs CUDA: ``python bench/probability_model.py``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch._dynamo  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

from ml.infer import _pad_first_conv  # noqa: E402
from ml.models import UnetSpec, build_unet  # noqa: E402

B, C, T = 6, 9, 1888


def median_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int = 8) -> float:
    with torch.no_grad():
        fn(x)
        fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return sorted(times)[n // 2]


def make(
    model: torch.nn.Module, dtype: torch.dtype, pad: bool, mode: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    net, extra = _pad_first_conv(copy.deepcopy(model)) if pad else (copy.deepcopy(model), 0)
    net = net.cuda().to(dtype).to(memory_format=torch.channels_last).eval()

    def step(t: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, extra)) if extra else t
        z = z.to(dtype).contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(net(z).float())[:, 0]

    if not mode:
        return step
    compiled = torch.compile(step, dynamic=False, mode=None if mode == "default" else mode)

    def run(t: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=True):
            out: torch.Tensor = compiled(t)
        return out

    return run


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    torch.backends.cudnn.benchmark = True
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    model = build_unet(UnetSpec()).eval()
    x = torch.randn(B, C, T, T, device="cuda")
    base = None
    runs = [
        (dtype, pad, mode)
        for dtype in (torch.float16, torch.bfloat16)
        for pad in (False, True)
        for mode in ("", "default")
    ] + [(torch.float16, True, "max-autotune-no-cudagraphs")]
    for dtype, pad, mode in runs:
        t = time.perf_counter()
        ms = median_ms(make(model, dtype, pad, mode), x)
        base = base or ms
        print(
            f"{dtype!s:15} first conv {'16' if pad else ' 9'} ch  {mode or 'eager':27} "
            f"{ms:7.2f} ms  {B * T * T / ms / 1e3:6.0f} Mpx/s  {base / ms:4.2f}x  "
            f"(setup {time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
