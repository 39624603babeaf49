"""Row strips for the embedded world: every full-size field lives on disk, not in memory.

The simulator builds a world of any size strip by strip. A strip is a band of whole rows
(full width) of about ``STRIP_PX`` pixels, starting on a multiple of six rows so that
20 m and 60 m pixels are never split. Full-size intermediate fields (white noise, smooth
noise, land cover per period) are raw files in a scratch folder (:class:`Field`), read
back a few rows at a time with plain file reads (no memory map, so they never count
towards the process's resident memory).

What needs the whole world is done in passes over the strips:

- smoothing (a Gaussian filter reads its strip plus a halo of ``4 sigma`` rows, which
  gives the same values as filtering the whole array), then normalising to zero mean
  and unit variance with sums taken row by row (:func:`smooth_noise`);
- order statistics and quantiles, exact, by a radix selection on the float32 bit
  patterns in two passes (:func:`order_stats`, :func:`quantile`).

A world that fits in one strip (the demo's) is computed exactly as the whole-array
simulator did, so its bytes do not change; a larger one differs from a whole-array
computation only in the last bits of the noise normalisation, and does not depend on
the strip height.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

#: Pixels per strip (rows x width). 4 Mpx keeps the simulator's working set under about
#: 1.5 GiB whatever the world's size (see bench/scale.py --stages simulate).
STRIP_PX = 4_000_000
#: Strips start on multiples of this many rows (20 m and 60 m pixels stay whole).
ROW_STEP = 6


@dataclass(frozen=True)
class Strips:
    """The world's rows cut into strips of ``rows`` rows (the last one may be shorter)."""

    height: int
    width: int
    rows: int

    @classmethod
    def for_shape(cls, shape: tuple[int, int], strip_px: int = STRIP_PX) -> Strips:
        h, w = shape
        rows = (strip_px // max(w, 1)) // ROW_STEP * ROW_STEP
        return cls(h, w, max(rows, ROW_STEP))

    @property
    def single(self) -> bool:
        """The whole world is one strip (computed exactly as the whole-array simulator)."""
        return self.rows >= self.height

    @property
    def size(self) -> int:
        return self.height * self.width

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.height, self.rows):
            yield r0, min(r0 + self.rows, self.height)

    def __len__(self) -> int:
        return -(-self.height // self.rows)


class Field:
    """A full-size 2-D array in a raw file, written and read by rows."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.typing.DTypeLike) -> None:
        self.path = path
        self.shape = shape
        self.dtype = np.dtype(dtype)
        with path.open("wb") as f:
            f.truncate(shape[0] * shape[1] * self.dtype.itemsize)

    def _offset(self, row: int) -> int:
        return row * self.shape[1] * self.dtype.itemsize

    def write(self, r0: int, rows: np.ndarray) -> None:
        assert rows.shape[1] == self.shape[1], (rows.shape, self.shape)
        with self.path.open("r+b") as f:
            f.seek(self._offset(r0))
            f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())

    def read(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        r1 = self.shape[0] if r1 is None else r1
        n = (r1 - r0) * self.shape[1]
        a = np.fromfile(self.path, dtype=self.dtype, count=n, offset=self._offset(r0))
        return a.reshape(r1 - r0, self.shape[1])

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class Scratch:
    """A folder of :class:`Field` files for one world (or one acquisition)."""

    def __init__(self, folder: Path, strips: Strips) -> None:
        self.folder = folder
        self.strips = strips
        self._n = 0
        folder.mkdir(parents=True, exist_ok=True)

    def field(self, dtype: np.typing.DTypeLike, name: str = "field") -> Field:
        self._n += 1
        path = self.folder / f"{self._n:04d}-{name}.raw"
        return Field(path, (self.strips.height, self.strips.width), dtype)

    def normal(self, rng: np.random.Generator, dtype: np.typing.DTypeLike = np.float64) -> Field:
        """White noise as ``rng.standard_normal(shape).astype(dtype)`` would draw it."""
        out = self.field(dtype, "white")
        w = self.strips.width
        for r0, r1 in self.strips:  # a Generator draws the same numbers in any chunking
            out.write(r0, rng.standard_normal((r1 - r0, w)).astype(dtype))
        return out

    def smooth_noise(self, rng: np.random.Generator, sigma: float) -> Field:
        """Gaussian-filtered white noise with zero mean and unit variance (float32)."""
        return smooth_noise(self, self.normal(rng), sigma)


def _row_sum(values: Callable[[int, int], np.ndarray], strips: Strips) -> float:
    """The sum over the world of ``values(r0, r1)``, the same for any strip height."""
    sums = np.concatenate([values(r0, r1).sum(axis=1) for r0, r1 in strips])
    return math.fsum(sums.tolist())


def smooth_noise(scratch: Scratch, white: Field, sigma: float) -> Field:
    """``white`` Gaussian-filtered (reflecting edges), centred and scaled to unit variance.

    One strip: the whole-array computation, bit for bit. Several: each strip is filtered
    with a halo of the filter's radius (identical values), the mean and variance are
    summed row by row (exactly rounded sums, independent of the strip height).
    """
    strips = scratch.strips
    out = scratch.field(np.float32, f"smooth{sigma:g}")
    if strips.single:
        z = ndimage.gaussian_filter(white.read(), sigma, mode="reflect")  # one strip: <= STRIP_PX
        z -= z.mean()
        sd = z.std()
        out.write(0, (z / sd if sd > 0 else z).astype(np.float32))
        white.delete()
        return out
    h = strips.height
    radius = int(4.0 * float(sigma) + 0.5)  # scipy's truncate=4.0
    filtered = scratch.field(np.float64, "filtered")
    for r0, r1 in strips:
        a0, a1 = max(r0 - radius, 0), min(r1 + radius, h)
        z = ndimage.gaussian_filter(white.read(a0, a1), sigma, mode="reflect")
        filtered.write(r0, z[r0 - a0 : r1 - a0])
    white.delete()
    n = strips.size
    m1 = _row_sum(filtered.read, strips) / n
    m2 = _row_sum(lambda r0, r1: filtered.read(r0, r1) - m1, strips) / n
    var = _row_sum(lambda r0, r1: np.square(filtered.read(r0, r1) - m1 - m2), strips) / n
    sd = math.sqrt(var)
    for r0, r1 in strips:
        z = filtered.read(r0, r1) - m1
        out.write(r0, (z / sd if sd > 0 else z).astype(np.float32))
    filtered.delete()
    return out


def _keys(values: np.ndarray) -> np.ndarray:
    """float32 values as uint32 keys in the same order (no NaN)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000))


def order_stats(
    chunks: Callable[[], Iterable[np.ndarray]], ks: Sequence[int]
) -> tuple[list[np.float32], int]:
    """The ``k``-th smallest (0-based) of all the float32 values ``chunks()`` yields.

    Exact, by radix selection: one pass counts the values per 16-bit key prefix, a
    second collects the values of the prefixes that hold a wanted rank. Also returns
    how many values there are.
    """
    counts = np.zeros(1 << 16, dtype=np.int64)
    for v in chunks():
        counts += np.bincount((_keys(v) >> 16).astype(np.int64), minlength=1 << 16)
    n = int(counts.sum())
    if not ks:
        return [], n
    if min(ks) < 0 or max(ks) >= n:
        raise ValueError(f"rank out of range: {list(ks)} of {n} values")
    cum = np.cumsum(counts)
    buckets = [int(np.searchsorted(cum, k, side="right")) for k in ks]
    wanted = sorted(set(buckets))
    found: dict[int, list[np.ndarray]] = {b: [] for b in wanted}
    for v in chunks():
        v = np.asarray(v, dtype=np.float32)
        prefix = _keys(v) >> 16
        for b in wanted:
            found[b].append(v[prefix == b])
    values = {b: np.sort(np.concatenate(found[b])) for b in wanted}
    out = []
    for k, b in zip(ks, buckets, strict=True):
        before = int(cum[b - 1]) if b > 0 else 0
        out.append(values[b][k - before])
    return out, n


def lerp_quantile(lo: np.generic, hi: np.generic, n: int, q: float) -> np.generic:
    """``np.quantile`` (linear) of ``n`` values from its two neighbouring order statistics
    ``lo`` (rank ``floor((n-1) q)``) and ``hi`` (the next rank, clipped to ``n - 1``).
    Bit for bit what ``np.quantile`` of the whole array returns."""
    v = (n - 1) * q
    gamma = float(v - np.floor(v))
    return np.quantile(np.array([lo, hi]), gamma)


def quantile_ranks(n: int, q: float) -> tuple[int, int]:
    """The two ranks :func:`lerp_quantile` needs."""
    lo = min(int(np.floor((n - 1) * q)), n - 1)
    return lo, min(lo + 1, n - 1)


def quantile(chunks: Callable[[], Iterable[np.ndarray]], n: int, q: float) -> np.generic:
    """``np.quantile(all values, q)`` of ``n`` float32 values yielded by ``chunks()``."""
    (lo, hi), _ = order_stats(chunks, quantile_ranks(n, q))
    return lerp_quantile(lo, hi, n, q)


def quantile_of_counts(counts: np.ndarray, q: float) -> float:
    """``np.quantile`` of the integers ``i`` repeated ``counts[i]`` times."""
    n = int(counts.sum())
    cum = np.cumsum(counts)
    lo, hi = (int(np.searchsorted(cum, k, side="right")) for k in quantile_ranks(n, q))
    return float(lerp_quantile(np.int64(lo), np.int64(hi), n, q))


def median_of_counts(counts: np.ndarray) -> float:
    """``np.median`` of the integers ``i`` repeated ``counts[i]`` times."""
    n = int(counts.sum())
    cum = np.cumsum(counts)
    ranks = [n // 2] if n % 2 else [n // 2 - 1, n // 2]
    mid = [int(np.searchsorted(cum, k, side="right")) for k in ranks]
    return float(np.median(np.array(mid, dtype=np.int64)))


def nth_set_pixel(
    row_counts: np.ndarray, j: int, row: Callable[[int], np.ndarray]
) -> tuple[int, int]:
    """(row, col) of the ``j``-th set pixel in row-major order (``np.nonzero``'s order),
    given the count of set pixels per row and a reader of one row's mask."""
    cum = np.cumsum(row_counts)
    r = int(np.searchsorted(cum, j, side="right"))
    k = j - (int(cum[r - 1]) if r > 0 else 0)
    return r, int(np.flatnonzero(row(r))[k])
