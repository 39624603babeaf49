"""Seeded U-Net training on chips cut from labelled composites, with early stopping.

Chips are random crops of the training scenes (read window by window from the
composites: ``ChipSource``), flipped and rotated by multiples of 90
degrees (the ground has no up); where the labels are sparse points, each chip is placed
around one of them (``ChipSource.anchors``). The loss is BCE plus soft Dice over labelled pixels
only. After each epoch the model predicts the validation scenes whole (tiled, as in
production) and the best validation IoU so far keeps its weights; training stops when it
has not improved for ``patience`` epochs. Same seed, same data, same device: same model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ml.features import IGNORE
from ml.infer import predict_tiled
from ml.models import UnetSpec, build_unet
from pipelines.infra.progress import Progress


@dataclass(frozen=True)
class TrainConfig:
    chip: int = 128
    batch: int = 16
    steps_per_epoch: int = 12
    max_epochs: int = 20
    patience: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 42
    spec: UnetSpec = field(default_factory=UnetSpec)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d


class ChipSource(Protocol):
    """Where training chips come from: an image of ``shape`` read window by window."""

    name: str
    #: (n, 2) pixel (row, col) of sparse labels (points), or None for dense labels:
    #: with anchors, every chip is placed to contain one of them.
    anchors: npt.NDArray[np.int64] | None

    @property
    def shape(self) -> tuple[int, int]: ...

    def labels(self, r0: int, c0: int, size: int) -> npt.NDArray[np.uint8]: ...

    def features(self, r0: int, c0: int, size: int) -> npt.NDArray[np.float32]: ...


@dataclass
class Labelled:
    """A normalised (c, y, x) image in memory, its labels (0, 1, IGNORE) and its name."""

    name: str
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.uint8]
    anchors: npt.NDArray[np.int64] | None = None
    valid: npt.NDArray[np.bool_] | None = None  # pixels with data (labelled or not)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.y.shape[0]), int(self.y.shape[1])

    def labels(self, r0: int, c0: int, size: int) -> npt.NDArray[np.uint8]:
        return self.y[r0 : r0 + size, c0 : c0 + size]

    def features(self, r0: int, c0: int, size: int) -> npt.NDArray[np.float32]:
        return self.x[:, r0 : r0 + size, c0 : c0 + size]


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    epochs: int
    best_val: dict[str, float]
    history: list[dict[str, float]]
    seconds: float
    device: str


def _seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _batch(
    scenes: Sequence[ChipSource], rng: np.random.Generator, chip: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(n):
        s = scenes[int(rng.integers(len(scenes)))]
        h, w = s.shape
        if s.anchors is not None and len(s.anchors):  # sparse labels: a chip around one
            ar, ac = s.anchors[int(rng.integers(len(s.anchors)))]
            r0 = min(max(int(ar) - int(rng.integers(chip)), 0), h - chip)
            c0 = min(max(int(ac) - int(rng.integers(chip)), 0), w - chip)
            y = s.labels(r0, c0, chip)
        else:
            for _try in range(10):  # prefer chips with some labelled pixels
                r0 = int(rng.integers(0, h - chip + 1))
                c0 = int(rng.integers(0, w - chip + 1))
                y = s.labels(r0, c0, chip)
                if (y != IGNORE).mean() > 0.3:
                    break
        x = s.features(r0, c0, chip)
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    known = (y != IGNORE).float()
    target = (y == 1).float()
    logit = logits[:, 0]
    bce = nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none")
    bce = (bce * known).sum() / known.sum().clamp(min=1)
    p = torch.sigmoid(logit) * known
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + (target * known).sum() + 1)
    return bce + dice


def train_unet(
    train: Sequence[ChipSource],
    val: Sequence[Labelled],
    config: TrainConfig | None = None,
    *,
    device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
    keep_last: bool = False,
) -> TrainResult:
    """Train a U-Net; early stopping on the validation scenes' IoU. ``keep_last``: train
    every epoch and keep the last weights (the validation IoU is only reported)."""
    cfg = config or TrainConfig()
    say = progress or (lambda _m: None)
    if not train or not val:
        raise ValueError("training needs at least one training and one validation scene")
    for s in train:  # validation windows may be smaller: they are predicted, not cut
        if min(s.shape) < cfg.chip:
            raise ValueError(f"scene {s.name} ({s.shape}) is smaller than a {cfg.chip} px chip")
    device = device or torch.device("cpu")
    _seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_unet(cfg.spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs)
    best: dict[str, float] = {"iou": -1.0}
    best_state: dict[str, Any] = {}
    best_epoch, history, stale = 0, [], 0
    started = time.perf_counter()
    epochs = Progress("training", cfg.max_epochs, say, unit="epochs", steps=cfg.max_epochs)
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        losses = []
        for _ in range(cfg.steps_per_epoch):
            x, y = _batch(train, rng, cfg.chip, cfg.batch)
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = _loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        model.eval()
        scores = _val_scores(model, val, device)
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4), **scores})
        epochs(
            epoch,
            f"loss {np.mean(losses):.3f}, val IoU {scores['iou']:.3f} "
            f"(best {max(best['iou'], scores['iou']):.3f}); early stopping may end it sooner",
        )
        if keep_last:
            best, best_epoch = scores, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif scores["iou"] > best["iou"]:
            best, best_epoch, stale = scores, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                say(f"early stop: no better validation IoU for {cfg.patience} epochs")
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model,
        best_epoch=best_epoch,
        epochs=len(history),
        best_val=best,
        history=history,
        seconds=time.perf_counter() - started,
        device=str(device),
    )


def _val_scores(
    model: nn.Module, val: Sequence[Labelled], device: torch.device
) -> dict[str, float]:
    from ml.metrics import confusion, scores

    totals = np.zeros(4, dtype=np.int64)
    for s in val:
        prob = predict_tiled(model, s.x, tile=128, overlap=16, device=device)
        totals += np.asarray(confusion(prob, s.y))
    return scores(*(int(v) for v in totals))
