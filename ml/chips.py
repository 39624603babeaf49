"""A chip classifier on real Sentinel-2 RGB chips, with whole regions held out.

The material: Amazon Mining Watch's training galleries (``../shared/data/chips``), PNG
grids of 48 x 48 px RGB chips, uint8 = clip(L1C DN [B4, B3, B2] / 3000, 0, 1) x 255, from
cloud-masked yearly composites, each gallery one sampling campaign: mines of one region
and epoch, or negatives of one kind (random land, riverbanks, industry, aquaculture,
landslides, Acre). The index CSV gives each chip's gallery, tile index and label.

The evaluation holds out whole campaigns from other places than the training ones, as
AMW holds out regions: the curated Peruvian mines (BD Mineria Aurifera, 2024) and the
Ecuadorian Puñino mines for sensitivity; the Acre (Brazil) and Bolivian riverbank
negatives for specificity. Everything else trains (with a tenth kept for early
stopping). The model is a small CNN (four conv blocks), seeded, with flips and
rotations; RGB is all these chips have (AMW's own figures use 13 bands).

Run: ``.venv/bin/python -m ml.chips [--chips DIR]``; it prints the split and the
held-out sensitivity and specificity.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

CHIP = 48
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "chips"
#: Campaigns held out (substring of the gallery file name), with the region they stand for.
HELDOUT: dict[str, str] = {
    "BD_MineriaAurifera_Peru": "Peru (curated mines, 2024)",
    "punino_positives": "Ecuador, Puñino (mines, 2025)",
    "acre_negatives": "Acre, Brazil (negatives, 2025)",
    "riverbank_negatives_bolivia": "Bolivia riverbanks (negatives, 2024)",
}


@dataclass
class Chips:
    x: npt.NDArray[np.uint8]  # (n, 3, 48, 48)
    y: npt.NDArray[np.int64]
    gallery: list[str]


def load_chips(directory: Path = DEFAULT_DIR) -> Chips:
    """Every chip of the index CSV, cut from its gallery PNG."""
    from PIL import Image

    index = directory / "amw_s2l1c_rgb_chips_48px_index.csv"
    if not index.exists():
        raise FileNotFoundError(f"chip index {index} not found (is ../shared/data present?)")
    by_gallery: dict[str, list[tuple[int, int]]] = defaultdict(list)
    with open(index, newline="") as f:
        for row in csv.DictReader(f):
            name = Path(row["gallery_png_in_keep"]).name
            by_gallery[name].append((int(row["tile_index"]), int(row["label"])))
    xs, ys, gal = [], [], []
    for name, entries in sorted(by_gallery.items()):
        img = np.asarray(Image.open(directory / "gallery" / name).convert("RGB"))
        ncols = img.shape[1] // CHIP
        for tile, label in entries:
            r, c = divmod(tile, ncols)
            chip = img[r * CHIP : (r + 1) * CHIP, c * CHIP : (c + 1) * CHIP]
            if chip.shape[:2] != (CHIP, CHIP):
                raise ValueError(f"{name}: tile {tile} lies outside the {img.shape[:2]} gallery")
            xs.append(chip.transpose(2, 0, 1))
            ys.append(label)
            gal.append(name)
    return Chips(np.stack(xs), np.asarray(ys, np.int64), gal)


def heldout_mask(chips: Chips) -> npt.NDArray[np.bool_]:
    return np.array([any(k in g for k in HELDOUT) for g in chips.gallery])


class ChipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )  # fmt: skip

        self.features = nn.Sequential(
            block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2),
            block(64, 128), nn.MaxPool2d(2), block(128, 128), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))[:, 0]
        return out


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(3)
    return x


def _scores(prob: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> dict[str, float]:
    pred = prob >= 0.5
    pos, neg = y == 1, y == 0
    return {
        "sensitivity": round(float(pred[pos].mean()), 4) if pos.any() else float("nan"),
        "specificity": round(float((~pred[neg]).mean()), 4) if neg.any() else float("nan"),
        "positives": int(pos.sum()),
        "negatives": int(neg.sum()),
    }


@torch.no_grad()
def predict(
    model: nn.Module, x: npt.NDArray[np.uint8], batch: int = 256
) -> npt.NDArray[np.float32]:
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        t = torch.from_numpy(x[i : i + batch]).float() / 255.0
        out.append(torch.sigmoid(model(t)).numpy())
    return np.concatenate(out).astype(np.float32)


def train_and_evaluate(
    chips: Chips,
    *,
    epochs: int = 12,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, object]:
    """Train on all but the held-out campaigns; report held-out sensitivity/specificity."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    held = heldout_mask(chips)
    idx = np.flatnonzero(~held)
    rng.shuffle(idx)
    n_val = len(idx) // 10
    val, train = idx[:n_val], idx[n_val:]
    say(
        f"chips: {len(chips.y)} ({int(chips.y.sum())} mines); training {len(train)}, "
        f"early-stopping {len(val)}, held out {int(held.sum())} from "
        f"{', '.join(HELDOUT.values())}"
    )
    model = ChipNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=epochs * ((len(train) + 63) // 64)
    )
    pos_weight = torch.tensor(
        float((chips.y[train] == 0).sum() / max(1, (chips.y[train] == 1).sum()))
    )
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(chips.x[train]).float() / 255.0
    yt = torch.from_numpy(chips.y[train]).float()
    best, best_state, started = -1.0, None, time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(order), 64):
            b = order[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(_augment(xt[b], gen)), yt[b])
            loss.backward()
            opt.step()
            sched.step()
        s = _scores(predict(model, chips.x[val]), chips.y[val])
        balanced = (s["sensitivity"] + s["specificity"]) / 2
        say(
            f"epoch {epoch}: validation sensitivity {s['sensitivity']:.3f}, specificity {s['specificity']:.3f}"
        )
        if balanced > best:
            best, best_state = balanced, {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    per_campaign = {}
    for key, label in HELDOUT.items():
        m = np.array([key in g for g in chips.gallery])
        per_campaign[label] = _scores(predict(model, chips.x[m]), chips.y[m])
    overall = _scores(predict(model, chips.x[held]), chips.y[held])
    return {
        "heldout": overall,
        "per_campaign": per_campaign,
        "seconds": round(time.perf_counter() - started, 1),
        "train": len(train),
        "validation": len(val),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="RGB chip classifier with regions held out")
    ap.add_argument("--chips", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = train_and_evaluate(load_chips(args.chips), epochs=args.epochs, seed=args.seed)
    h = res["heldout"]
    assert isinstance(h, dict)
    print(f"\nheld-out regions: sensitivity {h['sensitivity']:.3f} ({h['positives']} mines), "
          f"specificity {h['specificity']:.3f} ({h['negatives']} non-mines)")  # fmt: skip
    per = res["per_campaign"]
    assert isinstance(per, dict)
    for label, s in per.items():
        print(f"  {label}: {s}")
    print(f"trained in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
