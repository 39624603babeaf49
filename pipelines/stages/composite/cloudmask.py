"""s2cloudless on a composite block: the optional second cloud mask beside SCL.

Part of the composite stage (``cloud_mask: scl+s2cloudless`` on a region). Sen2Cor's
SCL misses thin cloud and haze at cloud edges; s2cloudless, Sentinel Hub's LightGBM
pixel classifier (its model ships inside the pip package), catches much of it. It runs
on the L1C twin of each scene (``pipelines.stages.stac.l1c``), whose ten top-of-atmosphere
bands odc-stac loads onto the composite's 10 m grid beside the L2A bands.

The classifier runs on every ``DECIMATE``-th pixel (80 m): LightGBM predicts about
60,000 pixels a second per core here, so running it at 10 m would cost 64 times more
than the whole median. The probability is smoothed and dilated at that step and the
mask repeated back to 10 m. Smoothing and dilation follow s2cloudless's advice for 10 m
data (a 220 m averaging disk, 110 m dilation), rounded to the 80 m step.
Blocks are processed without a halo, so the smoothing sees reflected edges at block
borders; the dilation keeps the mask conservative there.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

DECIMATE = 8
THRESHOLD = 0.4  # s2cloudless's default probability threshold
AVERAGE_OVER_M = 220
DILATION_M = 110


@functools.lru_cache(maxsize=1)
def detector() -> Any:
    """The s2cloudless detector (model loaded once per process)."""
    from s2cloudless import S2PixelCloudDetector

    step = 10 * DECIMATE
    return S2PixelCloudDetector(
        threshold=THRESHOLD,
        all_bands=False,
        average_over=max(1, round(AVERAGE_OVER_M / step)),
        dilation_size=max(1, round(DILATION_M / step)),
    )


def s2cloudless_mask(
    toa: npt.NDArray[np.float32], available: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_]:
    """Cloud mask (t, y, x) from TOA reflectance in s2cloudless's band order.

    ``toa`` is (t, 10, ys, xs): the block sampled every ``DECIMATE`` pixels (see
    ``decimate``); ``available`` (t, y, x) at full resolution says where the L1C twin
    has data, and elsewhere the mask is False (SCL alone decides there).
    """
    t, nb = toa.shape[:2]
    h, w = available.shape[1:]
    if nb != 10:
        raise ValueError(f"s2cloudless takes 10 bands, got {nb}")
    if t == 0 or not available.any():
        return np.zeros((t, h, w), dtype=bool)
    small = np.ascontiguousarray(toa.transpose(0, 2, 3, 1))
    det = detector()
    prob = det.get_cloud_probability_maps(np.nan_to_num(small, nan=0.0), num_threads=1)
    mask = det.get_mask_from_prob(prob).astype(bool)
    full = np.repeat(np.repeat(mask, DECIMATE, axis=1), DECIMATE, axis=2)[:, :h, :w]
    return full & available


def decimate(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Every ``DECIMATE``-th pixel of a (..., y, x) array, from the block's corner."""
    return a[..., ::DECIMATE, ::DECIMATE]
