"""The masked temporal median at the heart of the composite, as pure numpy kernels.

Third step of the flow (scenes -> **composite** -> probability): ``pipelines.stages.composite``
maps these kernels over dask blocks of a (time, y, x) stack. They take raw DN (uint16)
and a clear-sky mask and return the median per pixel over the clear observations only.

Why not ``np.nanmedian`` (what ``xarray``'s ``median`` runs per block)? It converts to
float, then sorts pixel by pixel through masked arrays; on a 20 x 512 x 512 stack it is
about 18x slower than this. Here masked observations are set to a sentinel that sorts
last (65535, for DN - 1, where nodata wraps to it by itself; +inf for floats), the
time axis is sorted by a
**sorting network** applied plane by plane (``np.minimum``/``np.maximum`` over a strip
of ``STRIP_ROWS`` rows of each image, so every step is a vectorised pass over contiguous
memory that stays in the CPU's cache), and the median is
read at positions ``(n-1)//2`` and ``n//2`` where ``n`` is the pixel's clear count.
Even counts average the two middle values, exactly as ``np.nanmedian`` does.

Scenes from different processing baselines carry different offsets (-0.1 from 04.00
on). The DN of each scene is shifted by ``(offset - reference offset) / scale`` first,
so one integer median serves all of them; when scales differ or shifts are not whole
DN the float path (``masked_median_float``) is used instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

DN_SENTINEL = np.uint16(65535)  # above any valid Sentinel-2 DN (15 bits of data)


@functools.lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i < j) of Batcher's odd-even merge sort for ``n`` items.

    Built for the next power of two; pairs that touch a position >= n are dropped,
    which is exact when the missing positions hold +infinity (they never move).
    """
    if n < 1:
        raise ValueError(f"sorting network size must be >= 1, got {n}")
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=64)
def median_network(n: int) -> tuple[tuple[int, int], ...]:
    """The sorting network for ``n``, pruned to what positions 0..n//2 depend on.

    The median of any count up to ``n`` reads only the lower half of the sorted
    order, so compare-exchanges that feed only the upper half are skipped.
    """
    needed = set(range(n // 2 + 1))
    kept: list[tuple[int, int]] = []
    for a, b in reversed(sorting_network(n)):
        if a in needed or b in needed:
            kept.append((a, b))
            needed.update((a, b))
    return tuple(reversed(kept))


def _sorted_planes(stack: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
    """The planes of ``stack`` (t, ...) in sorted order along axis 0 (the lower half
    exact), sorted in place by the median network. Each compare-exchange writes its
    maximum over one plane and its minimum into a spare one that takes the place of
    the other, instead of copying the minimum back: two passes where there were three."""
    planes = list(stack)
    if len(planes) < 2:
        return planes
    spare = np.empty_like(planes[0])
    for a, b in median_network(len(planes)):
        pa, pb = planes[a], planes[b]
        np.minimum(pa, pb, out=spare)
        np.maximum(pa, pb, out=pb)
        planes[a], spare = spare, pa
    return planes


def _read_median(
    planes: Sequence[npt.NDArray[Any]], count: npt.NDArray[np.integer]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The sorted ``planes``' values at positions (count - 1) // 2 and count // 2 of
    each pixel (position 0 where the count is 0), gathered from one flat copy of the
    lower half, the only part the median reads."""
    half = min(len(planes), len(planes) // 2 + 1)
    flat = np.stack(planes[:half]).reshape(-1)
    n = count.size
    at = np.arange(n, dtype=np.intp)
    c = count.reshape(-1).astype(np.intp)
    lo = flat.take(np.maximum(c - 1, 0) // 2 * n + at).reshape(count.shape)
    hi = flat.take(np.minimum(c // 2, half - 1) * n + at).reshape(count.shape)
    return lo, hi


def _median_of(
    work: npt.NDArray[np.generic], count: npt.NDArray[np.uint8], add: float = 0.0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Sort ``work`` (masked values already set to the sentinel) and read the medians,
    plus ``add``."""
    lo, hi = _read_median(_sorted_planes(work), count)
    med = lo.astype(np.float32)
    med += hi
    med *= np.float32(0.5)
    if add:
        med += np.float32(add)
    med[count == 0] = np.nan
    return med, count


#: Rows of a block taken through the median at once. A strip's (t, rows, x) stack
#: (20 x 32 x 1024 uint16: 1.3 MiB) stays in the CPU's cache through the masking, the
#: sorting network and the reading, where a whole 1024 px block's planes (2 MiB each)
#: go to memory and back at every compare-exchange (docs/performance.md).
STRIP_ROWS = 32


def masked_median_dn(
    dn: npt.NDArray[np.uint16],
    clear: npt.NDArray[np.bool_],
    shift: Sequence[int] | npt.NDArray[np.integer] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Median DN over clear observations, and the clear count, for a (t, y, x) stack.

    ``dn == 0`` is nodata and never counts. ``shift`` (one integer per time step) is
    added to valid DN first to bring scenes onto one offset. Returns float32 medians
    (NaN where no observation is clear; halves where the count is even) and uint8 counts.
    The stack goes through in strips of ``STRIP_ROWS`` rows; each pixel's median is
    its own, so the strips change nothing but the speed.
    """
    if dn.ndim != 3 or clear.shape != dn.shape:
        raise ValueError(f"dn {dn.shape} and clear {clear.shape} must be equal (t, y, x) shapes")
    if dn.shape[0] > 255:
        raise ValueError(f"at most 255 observations per composite, got {dn.shape[0]}")
    shifts = None
    if shift is not None and np.any(np.asarray(shift) != 0):
        shifts = np.asarray(shift, dtype=np.int32)[:, None, None]
    med = np.empty(dn.shape[1:], np.float32)
    count = np.empty(dn.shape[1:], np.uint8)
    for r0 in range(0, dn.shape[1], STRIP_ROWS):
        rows = slice(r0, r0 + STRIP_ROWS)
        d = dn[:, rows]
        # The sentinel by bits: 65535 is all ones, so x | 65535 is the sentinel and x | 0
        # is x. The median is taken of DN - 1, where nodata (0) wraps to the sentinel by
        # itself and valid DN keep their order; a cloudy one (clear 0) ORs in 0 - 1.
        if shifts is None:
            work = d - np.uint16(1)
            work |= np.subtract(clear[:, rows].view(np.uint8), np.uint8(1), dtype=np.uint16)
        else:
            masked = ~clear[:, rows] | (d == 0)
            shifted = d.astype(np.int32) + shifts
            kept = shifted[~masked]
            if kept.size and (kept.min() < 1 or kept.max() > 65534):
                raise OverflowError("shifted DN leave the uint16 range; use masked_median_float")
            work = shifted.astype(np.uint16)  # masked ones may wrap: the sentinel covers them
            work -= np.uint16(1)
            work |= masked.view(np.uint8).astype(np.uint16) * DN_SENTINEL
        # valid DN - 1 are at most 65534: the sentinel is exactly the masked
        count[rows] = d.shape[0] - (work == DN_SENTINEL).sum(axis=0, dtype=np.uint8)
        med[rows] = _median_of(work, count[rows], add=1.0)[0]
    return med, count


def masked_median_float(
    values: npt.NDArray[np.floating], valid: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """The same median for float data (any scale and offset); NaN never counts."""
    if values.ndim != 3 or valid.shape != values.shape:
        raise ValueError(
            f"values {values.shape} and valid {valid.shape} must be equal (t, y, x) shapes"
        )
    ok = valid & np.isfinite(values)
    work = np.where(ok, values.astype(np.float32), np.float32(np.inf))
    return _median_of(work, ok.sum(axis=0, dtype=np.uint8))
