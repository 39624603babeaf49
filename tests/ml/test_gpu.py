"""The CUDA path of tiled inference (bf16, channels-last, streamed uploads, compile).

Marked ``gpu``; skipped without CUDA (CI has none). Run on a GPU machine with
``pytest -m gpu tests/ml/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.features import Normalizer
from ml.infer import pick_device, pinned_empty, plan_tiles, predict_tiled
from ml.models import UnetSpec, build_unet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NORM = Normalizer(tuple([0.2] * 6 + [0.0] * 3), tuple([0.1] * 6 + [0.5] * 3))


def raw_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth raw features (reflectance and indices) with a NaN hole."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 37.0
    x = np.stack([0.2 + 0.1 * np.sin(yy + i) * np.cos(xx - i) for i in range(9)])
    x = (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)
    x[:, 10:30, 40:70] = np.nan
    return x


def unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_unet(UnetSpec()).eval()


@pytest.mark.parametrize("shape", [(700, 650), (200, 230), (40, 50)])
def test_cuda_matches_cpu_within_bf16(shape: tuple[int, int]) -> None:
    """Several tile rows (streamed), a scene padded by reflection, a tiny one."""
    x, model = raw_scene(*shape), unet()
    cuda = pick_device("auto")
    assert cuda.type == "cuda"
    cpu = predict_tiled(model, x, normalizer=NORM, tile=256, overlap=32, device=torch.device("cpu"))
    gpu = predict_tiled(model, x, normalizer=NORM, tile=256, overlap=32, device=cuda)
    assert gpu.shape == cpu.shape == shape
    assert (np.isnan(gpu) == np.isnan(cpu)).all() and np.isnan(gpu[10:30, 40:50]).all()
    ok = np.isfinite(cpu)
    d = np.abs(gpu[ok] - cpu[ok])
    assert d.mean() < 0.02 and d.max() < 0.2, (d.mean(), d.max())
    f32 = predict_tiled(
        model, x, normalizer=NORM, tile=256, overlap=32, device=cuda, dtype="float32"
    )
    assert np.abs(f32[ok] - cpu[ok]).max() < 5e-3  # TF32 convolutions at most


def test_pinned_and_ordinary_memory_give_the_same_bits() -> None:
    x, model = raw_scene(900, 700, seed=1), unet()
    pinned = pinned_empty(x.shape)
    pinned[:] = x
    assert torch.from_numpy(pinned).is_pinned()
    cuda = torch.device("cuda")
    a = predict_tiled(model, x, normalizer=NORM, tile=256, overlap=32, batch=3, device=cuda)
    b = predict_tiled(model, pinned, normalizer=NORM, tile=256, overlap=32, batch=3, device=cuda)
    assert np.array_equal(a, b, equal_nan=True)
    assert len(plan_tiles(900, 700, 256, 32).ys) > 3  # the streamed path was exercised


def test_changed_weights_are_not_served_from_the_cache() -> None:
    x, model = raw_scene(300, 300, seed=2), unet()
    cuda = torch.device("cuda")
    before = predict_tiled(model, x, normalizer=NORM, tile=256, device=cuda)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    after = predict_tiled(model, x, normalizer=NORM, tile=256, device=cuda)
    cpu = predict_tiled(model, x, normalizer=NORM, tile=256, device=torch.device("cpu"))
    ok = np.isfinite(cpu)
    assert np.abs(after[ok] - before[ok]).max() > 1e-3
    assert np.abs(after[ok] - cpu[ok]).mean() < 0.02


def test_compiled_matches_eager() -> None:
    x, model = raw_scene(600, 600, seed=3), unet()
    cuda = torch.device("cuda")
    eager = predict_tiled(model, x, normalizer=NORM, tile=512, overlap=32, batch=2, device=cuda)
    compiled = predict_tiled(
        model, x, normalizer=NORM, tile=512, overlap=32, batch=2, device=cuda, compile=True
    )
    ok = np.isfinite(eager)
    assert (np.isnan(compiled) == ~ok).all()
    d = np.abs(compiled[ok] - eager[ok])
    assert d.mean() < 0.01 and d.max() < 0.1, (d.mean(), d.max())


def test_half_precision_host_input_and_bf16_model_stay_close() -> None:
    """fp16 in host memory (what mining_probability uploads), and the bf16 model."""
    x, model = raw_scene(640, 520, seed=4), unet()
    cuda = torch.device("cuda")
    ref = predict_tiled(model, x, normalizer=NORM, tile=256, device=cuda, dtype="float32")
    ok = np.isfinite(ref)
    half = pinned_empty(x.shape, np.float16)
    half[:] = x
    for inp, dtype in ((half, "float16"), (x, "bfloat16"), (half, "bfloat16")):
        out = predict_tiled(model, inp, normalizer=NORM, tile=256, device=cuda, dtype=dtype)
        assert (np.isnan(out) == ~ok).all()
        d = np.abs(out[ok] - ref[ok])
        assert d.mean() < 0.02 and d.max() < 0.2, (dtype, inp.dtype, d.mean(), d.max())
