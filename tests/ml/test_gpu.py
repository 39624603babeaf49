"""The CUDA path of tiled inference (bf16 autocast, channels-last); skips without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.infer import pick_device, predict_tiled
from ml.models import UnetSpec, build_unet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_inference_matches_cpu_within_bf16() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 700, 650)).astype(np.float32)
    torch.manual_seed(0)
    model = build_unet(UnetSpec()).eval()
    cpu = predict_tiled(model, x, tile=256, overlap=32, device=torch.device("cpu"))
    gpu = predict_tiled(model, x, tile=256, overlap=32, device=pick_device("auto"))
    assert pick_device("auto").type == "cuda"
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all()
    assert np.abs(gpu - cpu).mean() < 0.02 and np.abs(gpu - cpu).max() < 0.2
