"""Tiled, batched inference over a whole composite, with overlap and blending.

A scene is far larger than what a U-Net should see at once, so it is cut into tiles
that overlap by at least ``overlap`` pixels. ``plan_tiles`` spreads the fewest tiles of
at most ``tile`` pixels evenly over each axis (tile edges a multiple of 32, the U-Net's
stride), so a 10980 px Sentinel-2 tile costs 6 % more pixels with 2048 px tiles, not the
25 % that a fixed stride with a last tile flush to the edge would. Each tile's
probabilities are weighted by a window that ramps down towards its edges (where a
convolution sees padding, not context); the windows are separable and normalised per
axis beforehand, so the weighted tiles sum to a finished probability with no division
afterwards and no seams.

Inputs may be raw features with NaN (pass the model's ``Normalizer``): normalisation
(NaN -> 0, the training mean) happens per tile on the device, and pixels where any band
is not finite come out NaN.

CUDA path (``_predict_cuda``): the model runs with fp16 (or bf16) weights and
activations, channels-last, its first convolution padded to 16 input channels (cuDNN and
Triton kernels want multiples of 8), optionally ``torch.compile``d (inductor, frozen
weights). fp16 is the default: on an H100 it ran this U-Net 20 % faster than bf16 and
came 10x closer to float32 (docs/performance.md); should fp16 ever overflow (a
non-finite probability), the scene is redone in bf16 with a warning. Host-to-device
copies of the scene go row by row on their own stream while the previous tile row
computes; finished output rows go back on a third stream. With the scene in page-locked
(pinned) host memory (``pinned_empty``; ``read_composite(pinned=True)``) the copies
overlap the model; from ordinary memory they are correct but serialised. The scene may
be float32 or float16 in host memory (half the bytes to upload). The CPU path runs the
same plan in float32.
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

log = logging.getLogger(__name__)

STRIDE = 32  # the U-Net's total downsampling: tile edges must be a multiple of it
FREEZE_WEIGHTS = True  # inductor freezing when compiling (bench/probability.py compares)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(prefer: str = "auto") -> torch.device:
    """``cuda`` when present (or asked for), else ``cpu``."""
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "cuda" or (prefer == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def pinned_empty(shape: Sequence[int], dtype: Any = np.float32) -> npt.NDArray[Any]:
    """A numpy array in page-locked host memory (ordinary memory without CUDA).

    Host-to-device copies from such memory run asynchronously at the bus's full rate,
    which is what lets ``predict_tiled`` overlap the scene's upload with the model.
    """
    tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    t = torch.empty(tuple(shape), dtype=tdtype, pin_memory=torch.cuda.is_available())
    return t.numpy()


def ramp(tile: int, overlap: int) -> torch.Tensor:
    """1-D window: 1 in the middle, a linear ramp over ``overlap`` at each end, never 0."""
    w = torch.ones(tile, dtype=torch.float32)
    if overlap > 0:
        r = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        w[:overlap] = r
        w[-overlap:] = r.flip(0)
    return w


def blend_window(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) weights: the outer product of two ``ramp`` windows."""
    w = ramp(tile, overlap)
    return torch.outer(w, w)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride``, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def even_starts(size: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile edge, origins): the fewest tiles of at most ``tile`` px over ``size`` px.

    The edge is shrunk to the smallest multiple of 32 that still covers the axis with
    neighbours sharing at least ``overlap`` px, and the origins are spread evenly (first
    at 0, last flush with the end). An axis shorter than ``tile`` is one tile, rounded up
    to a multiple of 32; the scene is padded to it.
    """
    if size <= tile:
        return math.ceil(size / STRIDE) * STRIDE, [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    edge = min(tile, math.ceil((size + (n - 1) * overlap) / n / STRIDE) * STRIDE)
    if n == 1:
        return edge, [0]
    # floor keeps every step <= ceil((size - edge) / (n - 1)) <= edge - overlap
    return edge, [i * (size - edge) // (n - 1) for i in range(n)]


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one scene go, and their normalised blending weights."""

    height: int  # the scene
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    overlap: int
    # A part of a larger plan (``sub_plan``): the whole plan's weights of these windows.
    fixed: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, compare=False)

    @property
    def padded(self) -> tuple[int, int]:
        return max(self.height, self.tile_h), max(self.width, self.tile_w)

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def computed_pixels(self) -> int:
        return self.n_tiles * self.tile_h * self.tile_w

    def weights(self, axis: int) -> torch.Tensor:
        """(tiles along ``axis``, tile edge): each tile's ramp over the ramps' sum there."""
        if self.fixed is not None:
            return self.fixed[axis]
        starts, edge = (self.ys, self.tile_h) if axis == 0 else (self.xs, self.tile_w)
        length = self.padded[axis]
        w = ramp(edge, self.overlap)
        total = torch.zeros(length)
        for s in starts:
            total[s : s + edge] += w
        return torch.stack([w / total[s : s + edge] for s in starts])


def plan_tiles(height: int, width: int, tile: int | tuple[int, int], overlap: int) -> TilePlan:
    """A ``TilePlan`` for a ``height`` x ``width`` scene; ``tile`` is the largest edge."""
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    for t in (th, tw):
        if t <= 0 or t % STRIDE:
            raise ValueError(f"tile must be a multiple of {STRIDE} (the U-Net's stride), got {t}")
        if not 0 <= 2 * overlap < t:
            raise ValueError(f"overlap {overlap} must be below half the tile ({t})")
    eh, ys = even_starts(height, th, overlap)
    ew, xs = even_starts(width, tw, overlap)
    return TilePlan(height, width, eh, ew, tuple(ys), tuple(xs), overlap)


def _windows(
    plan: TilePlan, rows: list[int], cols: list[int]
) -> tuple[TilePlan, tuple[int, int, int, int]] | None:
    """The windows ``rows`` x ``cols`` (consecutive indexes) of ``plan`` as a plan over
    the pixels they cover (clipped to the scene), with the whole plan's weights."""
    if not rows or not cols:
        return None
    i0, i1, j0, j1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    r0, r1 = plan.ys[i0], min(plan.height, plan.ys[i1 - 1] + plan.tile_h)
    c0, c1 = plan.xs[j0], min(plan.width, plan.xs[j1 - 1] + plan.tile_w)
    part = TilePlan(
        height=r1 - r0, width=c1 - c0, tile_h=plan.tile_h, tile_w=plan.tile_w,
        ys=tuple(y - r0 for y in plan.ys[i0:i1]), xs=tuple(x - c0 for x in plan.xs[j0:j1]),
        overlap=plan.overlap, fixed=(plan.weights(0)[i0:i1], plan.weights(1)[j0:j1]),
    )  # fmt: skip
    return part, (r0, r1, c0, c1)


def sub_plan(
    plan: TilePlan, row0: int, row1: int, col0: int, col1: int
) -> tuple[TilePlan, tuple[int, int, int, int]]:
    """The windows of ``plan`` that overlap rows [row0, row1) x cols [col0, col1).

    Returns the part as a plan over the pixels those windows cover (clipped to the
    scene), with the whole plan's blending weights, and those pixels as
    (row0, row1, col0, col1). Predicting the part and keeping the requested rows and
    columns gives the whole-scene prediction there: same windows, same weights, same
    padding at the scene's edge.
    """
    rows = [k for k, y in enumerate(plan.ys) if y < row1 and y + plan.tile_h > row0]
    cols = [k for k, x in enumerate(plan.xs) if x < col1 and x + plan.tile_w > col0]
    part = _windows(plan, rows, cols)
    if part is None:
        raise ValueError(f"rows {row0}-{row1}, cols {col0}-{col1} lie outside the plan")
    return part


def owned_plan(
    plan: TilePlan, row0: int, row1: int, col0: int, col1: int
) -> tuple[TilePlan, tuple[int, int, int, int]] | None:
    """The windows of ``plan`` whose origin lies in rows [row0, row1) x cols [col0, col1).

    Cutting a scene into such blocks gives every window to exactly one block, so no
    window is computed twice. Returns the part as a plan over the pixels its windows
    cover (they reach past the block's end by up to a window) with the whole plan's
    weights, and those pixels; None when no window starts in the block. The scene's
    prediction is the sum of the parts' predictions (``predict_tiled(..., plan=part)``).
    """
    rows = [k for k, y in enumerate(plan.ys) if row0 <= y < row1]
    cols = [k for k, x in enumerate(plan.xs) if col0 <= x < col1]
    return _windows(plan, rows, cols)


def _check(x: npt.NDArray[Any], normalizer: Any) -> None:
    if x.ndim != 3:
        raise ValueError(f"expected a (channels, height, width) array, got shape {x.shape}")
    if normalizer is not None and len(normalizer.mean) != x.shape[0]:
        raise ValueError(
            f"the normaliser has {len(normalizer.mean)} channels, the image {x.shape[0]}"
        )


@torch.no_grad()
def predict_tiled(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    *,
    normalizer: Any = None,
    valid: npt.NDArray[np.bool_] | None = None,
    tile: int | tuple[int, int] = 256,
    overlap: int = 32,
    batch: int = 16,
    device: torch.device | None = None,
    dtype: str = "float16",
    compile: bool | str = False,
    progress: Callable[[int, int], None] | None = None,
    plan: TilePlan | None = None,
) -> npt.NDArray[np.float32]:
    """Probability (h, w) for a (c, h, w) image.

    ``plan``: the windows to run (``sub_plan`` of a larger scene's plan); by default
    ``plan_tiles(h, w, tile, overlap)``.

    ``normalizer`` (``ml.features.Normalizer``): ``x`` holds raw features with NaN and is
    normalised per tile; the output is NaN wherever a band is not finite. Without it,
    ``x`` is already normalised and finite. ``valid`` (h, w) also sets NaN where False.
    ``dtype`` and ``compile`` (False, True or an inductor mode such as
    ``"max-autotune-no-cudagraphs"``) apply on CUDA only; the CPU runs float32, eagerly.
    """
    _check(x, normalizer)
    device = device or pick_device()
    if plan is None:
        plan = plan_tiles(x.shape[1], x.shape[2], tile, overlap)
    elif (plan.height, plan.width) != x.shape[1:]:
        raise ValueError(f"plan is for {plan.height} x {plan.width} px, the image {x.shape[1:]}")
    if device.type == "cuda":
        mode = ("default" if compile is True else compile) or ""
        out, overflow = _predict_cuda(
            model, x, plan, normalizer, batch, device, dtype, mode, progress
        )
        if overflow and dtype == "float16":
            log.warning("fp16 inference overflowed (non-finite output); redoing it in bf16")
            out, _ = _predict_cuda(
                model, x, plan, normalizer, batch, device, "bfloat16", mode, progress
            )
    else:
        out = _predict_cpu(model, x, plan, normalizer, batch, progress)
    # The blended sum of probabilities can round a hair past 1 (weights are normalised
    # per axis in float32): keep the output a probability.
    np.clip(out, 0.0, 1.0, out=out)
    if valid is not None:
        out[~valid] = np.nan
    return out


def _pad(img: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Pad a (c, h, w) scene up to the plan's tiles: reflect where it can, else replicate."""
    ph, pw = plan.padded[0] - plan.height, plan.padded[1] - plan.width
    if not (ph or pw):
        return img
    mode = "reflect" if ph < plan.height and pw < plan.width else "replicate"
    return torch.nn.functional.pad(img[None], (0, pw, 0, ph), mode=mode)[0]


def _stats(normalizer: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if normalizer is None:
        return None
    mean = torch.tensor(normalizer.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(normalizer.std, dtype=torch.float32, device=device)[:, None, None]
    return mean, std


def _normalise(
    tiles: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    if stats is None:
        return tiles
    z = (tiles - stats[0]) / stats[1]
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


def _predict_cpu(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    plan: TilePlan,
    normalizer: Any,
    batch: int,
    progress: Callable[[int, int], None] | None,
) -> npt.NDArray[np.float32]:
    cpu = torch.device("cpu")
    model = model.to(cpu).eval()
    img = _pad(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), plan)
    stats = _stats(normalizer, cpu)
    acc = torch.zeros(plan.padded, dtype=torch.float32)
    wy, wx = plan.weights(0), plan.weights(1)
    origins = [(i, j) for i in range(len(plan.ys)) for j in range(len(plan.xs))]
    n_batches = math.ceil(len(origins) / batch)
    th, tw = plan.tile_h, plan.tile_w
    for b in range(n_batches):
        chunk = origins[b * batch : (b + 1) * batch]
        tiles = torch.stack([img[:, plan.ys[i] : plan.ys[i] + th, plan.xs[j] : plan.xs[j] + tw] for i, j in chunk])  # fmt: skip
        prob = torch.sigmoid(model(_normalise(tiles, stats)).float())[:, 0]
        for (i, j), p in zip(chunk, prob, strict=True):
            y, xx = plan.ys[i], plan.xs[j]
            acc[y : y + th, xx : xx + tw] += p * torch.outer(wy[i], wx[j])
        if progress is not None:
            progress(b + 1, n_batches)
    out = acc[: plan.height, : plan.width].numpy().astype(np.float32)
    if normalizer is not None:
        out[~np.isfinite(x).all(axis=0)] = np.nan
    return out


class _Prepared:
    """A device copy of a model (dtype, channels-last) and its step, maybe compiled."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, mode: str):
        self.source = weakref.ref(model)
        self.versions = _versions(model)
        net, extra = _pad_first_conv(copy.deepcopy(model).eval())
        net = net.to(device=device, dtype=dtype)
        self.net = net.to(memory_format=torch.channels_last)
        self.dtype = dtype

        def step(tiles: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
            z = torch.nan_to_num((tiles.float() - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)
            if extra:
                z = torch.nn.functional.pad(z, (0, 0, 0, 0, 0, extra))
            z = z.to(dtype).contiguous(memory_format=torch.channels_last)
            return torch.sigmoid(self.net(z).float())[:, 0]

        if not mode:
            self.step: Callable[..., torch.Tensor] = step
            return
        import torch._inductor.config as inductor_config

        compiled = torch.compile(step, dynamic=False, mode=None if mode == "default" else mode)

        def frozen(*args: torch.Tensor) -> torch.Tensor:
            # Inference-only graphs: weights become constants (conv-BN folding and all).
            with inductor_config.patch(freezing=FREEZE_WEIGHTS):
                out: torch.Tensor = compiled(*args)
            return out

        self.step = frozen


_PREPARED: dict[tuple[int, str, torch.dtype, str], _Prepared] = {}


def _pad_first_conv(net: nn.Module, multiple: int = 8) -> tuple[nn.Module, int]:
    """Give the first convolution a multiple of 8 input channels (extra weights 0).

    The output is unchanged (the extra input channels are zeros times zero weights);
    channels-last kernels for 9 channels are markedly slower than for 16.
    """
    for name, conv in net.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        extra = -conv.in_channels % multiple
        if not extra or conv.groups != 1:
            return net, 0
        wide = copy.deepcopy(conv)
        weight = torch.zeros((conv.out_channels, conv.in_channels + extra, *conv.kernel_size))
        with torch.no_grad():
            weight[:, : conv.in_channels] = conv.weight
        wide.weight = nn.Parameter(weight, requires_grad=False)
        wide.in_channels = conv.in_channels + extra
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, wide)
        return net, extra
    return net, 0


def _versions(model: nn.Module) -> tuple[int, ...]:
    """In-place updates (optimizer steps) bump a tensor's version: a stale copy shows."""
    return tuple(p._version for p in model.parameters())


def prepared(model: nn.Module, device: torch.device, dtype: str, mode: str) -> _Prepared:
    """The cached device copy of ``model``, rebuilt when the model's weights changed.

    ``mode``: "" (eager) or an inductor mode ("default", "max-autotune", ...).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    key = (id(model), str(device), DTYPES[dtype], mode)
    hit = _PREPARED.get(key)
    if hit is None or hit.source() is not model or hit.versions != _versions(model):
        for k in [k for k, v in _PREPARED.items() if v.source() is None]:
            del _PREPARED[k]
        hit = _PREPARED[key] = _Prepared(model, device, DTYPES[dtype], mode)
    return hit


def _predict_cuda(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    plan: TilePlan,
    normalizer: Any,
    batch: int,
    device: torch.device,
    dtype: str,
    mode: str,
    progress: Callable[[int, int], None] | None,
) -> tuple[npt.NDArray[np.float32], bool]:
    """(probability, whether any output was not finite where the input was)."""
    prep = prepared(model, device, dtype, mode)
    c, h, w = x.shape
    H, W = plan.padded
    th, tw = plan.tile_h, plan.tile_w
    host = x.dtype if x.dtype in (np.float16, np.float32) else np.float32
    src = torch.from_numpy(np.ascontiguousarray(x, dtype=host))
    main = torch.cuda.current_stream(device)
    upload, download = torch.cuda.Stream(device), torch.cuda.Stream(device)
    if normalizer is None:
        mean = torch.zeros((c, 1, 1), device=device)
        std = torch.ones((c, 1, 1), device=device)
    else:
        mean, std = _stats(normalizer, device)  # type: ignore[misc]

    # Upload: row blocks in the order the tile rows need them, one event per tile row.
    img = torch.empty((c, H, W), dtype=src.dtype, device=device)
    ready: list[torch.cuda.Event] = []
    ph, pw = H - h, W - w  # padding up to one tile, reflected as on the CPU
    if ph >= h or pw >= w:  # a scene far smaller than a tile: pad on the device, at once
        img.copy_(_pad(src.to(device), plan))
        ready = [torch.cuda.Event() for _ in plan.ys]
        for ev in ready:
            ev.record(main)
    else:
        upload.wait_stream(main)  # img's allocation is ordered before its first write
        done = 0
        with torch.cuda.stream(upload):
            for i, y in enumerate(plan.ys):
                end = min(h, y + th)
                if end > done:
                    for ch in range(c):
                        img[ch, done:end, :w].copy_(src[ch, done:end], non_blocking=True)
                    if pw:
                        img[:, done:end, w:] = img[:, done:end, w - 1 - pw : w - 1].flip(-1)
                    done = end
                if ph and i == len(plan.ys) - 1:
                    img[:, h:] = img[:, h - 1 - ph : h - 1].flip(1)
                ev = torch.cuda.Event()
                ev.record(upload)
                ready.append(ev)
        img.record_stream(upload)

    acc = torch.zeros((H, W), dtype=torch.float32, device=device)
    out = torch.empty((h, w), dtype=torch.float32, pin_memory=True)
    wy, wx = plan.weights(0).to(device), plan.weights(1).to(device)
    cols = list(range(len(plan.xs)))
    chunks = [cols[k : k + batch] for k in range(0, len(cols), batch)]
    finished = 0  # output rows already sent back
    overflow = torch.zeros((), dtype=torch.bool, device=device)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False):
        for i, y in enumerate(plan.ys):
            main.wait_event(ready[i])
            for chunk in chunks:
                tiles = torch.stack(
                    [img[:, y : y + th, plan.xs[j] : plan.xs[j] + tw] for j in chunk]
                )
                prob = prep.step(tiles, mean, std)
                overflow |= ~torch.isfinite(prob).all()
                for k, j in enumerate(chunk):
                    xx = plan.xs[j]
                    acc[y : y + th, xx : xx + tw].addcmul_(prob[k], wy[i][:, None] * wx[j][None, :])
            # Rows above the next tile row are final: mask them and send them back.
            end = min(h, plan.ys[i + 1] if i + 1 < len(plan.ys) else h)
            if end > finished:
                rows = acc[finished:end, :w]
                if normalizer is not None:
                    bad = ~torch.isfinite(img[:, finished:end, :w]).all(dim=0)
                    rows = rows.masked_fill(bad, float("nan"))
                rows = rows.contiguous()
                download.wait_stream(main)
                with torch.cuda.stream(download):
                    out[finished:end].copy_(rows, non_blocking=True)
                rows.record_stream(download)
                finished = end
            if progress is not None:
                progress(i + 1, len(plan.ys))
    download.synchronize()
    main.synchronize()
    return out.numpy(), bool(overflow)
