"""Tiled, batched inference over a whole composite, with overlap and blending.

A scene is far larger than what a U-Net should see at once, so it is cut into square
tiles that overlap by ``overlap`` pixels. Each tile's probabilities are weighted by a
window that ramps down towards the tile's edges (where a convolution sees padding, not
context) and the weighted sum is divided by the summed weights. Every pixel is covered,
each tile edge is outweighed by its neighbour's centre, and there are no seams.

On CUDA the whole scene, the accumulators and the model live on the GPU; tiles are
sliced there (no host round trip per tile), run in bf16 autocast and channels-last.
On CPU the same code runs in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


def pick_device(prefer: str = "auto") -> torch.device:
    """``cuda`` when present (or asked for), else ``cpu``."""
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "cuda" or (prefer == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def blend_window(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) weights: 1 in the middle, a linear ramp over ``overlap`` at each edge."""
    w = torch.ones(tile, dtype=torch.float32)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        w[:overlap] = ramp
        w[-overlap:] = ramp.flip(0)
    return torch.outer(w, w)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride``, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


@torch.no_grad()
def predict_tiled(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    *,
    valid: npt.NDArray[np.bool_] | None = None,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 16,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Probability (h, w) for a normalised (c, h, w) image; NaN where ``valid`` is False."""
    if x.ndim != 3:
        raise ValueError(f"expected a (channels, height, width) array, got shape {x.shape}")
    if tile % 32:
        raise ValueError(f"tile must be a multiple of 32 (the U-Net's stride), got {tile}")
    if not 0 <= 2 * overlap < tile:
        raise ValueError(f"overlap {overlap} must be below half the tile ({tile})")
    device = device or pick_device()
    cuda = device.type == "cuda"
    h, w = x.shape[1:]
    # Small scenes: pad up to one tile.
    ph, pw = max(0, tile - h), max(0, tile - w)
    img = torch.from_numpy(np.ascontiguousarray(x))
    if ph or pw:
        # reflect where the scene is large enough, else repeat the edge
        mode = "reflect" if ph < h and pw < w else "replicate"
        img = torch.nn.functional.pad(img[None], (0, pw, 0, ph), mode=mode)[0]
    H, W = img.shape[1:]
    img = img.to(device, non_blocking=True)
    acc = torch.zeros((H, W), dtype=torch.float32, device=device)
    wsum = torch.zeros((H, W), dtype=torch.float32, device=device)
    win = blend_window(tile, overlap).to(device)
    model = model.to(device).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    stride = tile - overlap
    origins = [(y, xx) for y in tile_starts(H, tile, stride) for xx in tile_starts(W, tile, stride)]
    n_batches = math.ceil(len(origins) / batch)
    for b in range(n_batches):
        chunk = origins[b * batch : (b + 1) * batch]
        tiles = torch.stack([img[:, y : y + tile, xx : xx + tile] for y, xx in chunk])
        if cuda:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tiles)
        else:
            logits = model(tiles)
        prob = torch.sigmoid(logits.float())[:, 0]
        for (y, xx), p in zip(chunk, prob, strict=True):
            acc[y : y + tile, xx : xx + tile] += p * win
            wsum[y : y + tile, xx : xx + tile] += win
        if progress is not None:
            progress(b + 1, n_batches)
    out = (acc / wsum)[:h, :w].cpu().numpy()
    if valid is not None:
        out[~valid] = np.nan
    return out.astype(np.float32)
