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

The benchmark (``benchmark``; issue 19) makes the figures comparable with Amazon Mining
Watch's (sensitivity on a held-out region's mines, specificity on mostly ordinary
landscape): besides the held-out campaigns, a fixed 30 % of AMW's random negatives
(``random_negatives10k``; they carry no coordinates, so the share is drawn at random,
the same for every seed) is held out, and three figures are reported separately:
sensitivity on the held-out mines, specificity on the held-out random negatives, and
specificity on the held-out hard negatives (Acre, Bolivian riverbanks). Each is given at
the fixed threshold 0.5 and, from the ROC curve, as the sensitivity where specificity
on random negatives is 0.99; over ``--seeds`` seeds (mean and spread) and for their
ensemble (the mean probability). Predictions average the eight flips and rotations of
a chip (test-time augmentation).

Run: ``.venv/bin/python -m ml.chips [--chips DIR] [--seeds 5] [--roc PNG]``; it prints
the split, each seed's figures and a Markdown table.
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
    """The chips of the held-out campaigns (whole galleries)."""
    return np.array([any(k in g for k in HELDOUT) for g in chips.gallery])


RANDOM_NEGATIVES = "random_negatives10k"  # AMW's random landscape negatives (no coordinates)
RANDOM_HELDOUT = 0.3  # share of them held out, drawn once with SPLIT_SEED
SPLIT_SEED = 2026
VALIDATION_SHARE = 0.1  # of the rest, for early stopping (drawn with each seed)


@dataclass(frozen=True)
class Split:
    """Chip indexes: training, early stopping, and the three held-out sets."""

    train: npt.NDArray[np.int64]
    val: npt.NDArray[np.int64]
    mines: npt.NDArray[np.int64]  # held-out campaigns' mines
    random: npt.NDArray[np.int64]  # held-out random negatives
    hard: npt.NDArray[np.int64]  # held-out campaigns' negatives (Acre, riverbanks)


def split(chips: Chips, seed: int) -> Split:
    """The benchmark's split; the held-out sets do not depend on ``seed``."""
    held = heldout_mask(chips)
    random = np.flatnonzero([RANDOM_NEGATIVES in g for g in chips.gallery])
    pick = np.random.default_rng(SPLIT_SEED).permutation(random)
    held_random = np.sort(pick[: round(RANDOM_HELDOUT * len(random))])
    rest = np.flatnonzero(~held & ~np.isin(np.arange(len(chips.y)), held_random))
    rest = np.random.default_rng(seed).permutation(rest)
    n_val = round(VALIDATION_SHARE * len(rest))
    return Split(
        train=np.sort(rest[n_val:]),
        val=np.sort(rest[:n_val]),
        mines=np.flatnonzero(held & (chips.y == 1)),
        random=held_random,
        hard=np.flatnonzero(held & (chips.y == 0)),
    )


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


def _augment(x: torch.Tensor, gen: torch.Generator, jitter: float = 0.0) -> torch.Tensor:
    """A rotation by a multiple of 90 degrees and a flip (the ground has no up); with
    ``jitter``, each chip's brightness and each channel's gain scaled by up to that
    fraction (composites of other years, haze and sensors differ in tone)."""
    k = int(torch.randint(4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(3)
    if jitter:
        n = x.shape[0]
        gain = 1 + jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
        gain = gain * (1 + jitter / 2 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1))
        x = (x * gain).clamp(0, 1)
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
    model: nn.Module, x: npt.NDArray[np.uint8], batch: int = 256, tta: bool = False
) -> npt.NDArray[np.float32]:
    """Mining probability per chip; with ``tta``, the mean over its 8 flips and rotations."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        t = torch.from_numpy(x[i : i + batch]).float() / 255.0
        views = [torch.rot90(v, k, dims=(2, 3)) for v in (t, t.flip(3)) for k in range(4)]
        out.append(torch.stack([torch.sigmoid(model(v)) for v in (views if tta else [t])]).mean(0).numpy())  # fmt: skip
    return np.concatenate(out).astype(np.float32)


def train_and_evaluate(
    chips: Chips,
    *,
    epochs: int = 12,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, object]:
    """Train on all but the held-out campaigns; report held-out sensitivity/specificity
    (the first protocol: hard negatives only; ``benchmark`` adds random ones)."""
    started = time.perf_counter()
    held = heldout_mask(chips)
    idx = np.random.default_rng(seed).permutation(np.flatnonzero(~held))
    n_val = len(idx) // 10
    none = np.zeros(0, np.int64)
    sp = Split(np.sort(idx[n_val:]), np.sort(idx[:n_val]), none, none, none)
    say(
        f"chips: {len(chips.y)} ({int(chips.y.sum())} mines); training {len(sp.train)}, "
        f"early-stopping {len(sp.val)}, held out {int(held.sum())} from "
        f"{', '.join(HELDOUT.values())}"
    )
    model = fit(chips, sp, epochs=epochs, seed=seed, say=say)
    per_campaign = {}
    for key, label in HELDOUT.items():
        m = np.array([key in g for g in chips.gallery])
        per_campaign[label] = _scores(predict(model, chips.x[m]), chips.y[m])
    overall = _scores(predict(model, chips.x[held]), chips.y[held])
    return {
        "heldout": overall,
        "per_campaign": per_campaign,
        "seconds": round(time.perf_counter() - started, 1),
        "train": len(sp.train),
        "validation": len(sp.val),
    }


def _auc(prob: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    """Area under the ROC curve: the chance a mine scores above a non-mine (ties half)."""
    pos, neg = prob[y == 1], prob[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def figures(prob: npt.NDArray[np.float32], sp: Split) -> dict[str, float]:
    """The three held-out figures at threshold 0.5, and the sensitivity where the
    specificity on random negatives is 0.99 (the threshold above 99 % of them)."""
    mines, rand, hard = prob[sp.mines], prob[sp.random], prob[sp.hard]
    at99 = float(np.quantile(rand, 0.99, method="higher"))
    return {
        "sensitivity": round(float((mines >= 0.5).mean()), 4),
        "specificity_random": round(float((rand < 0.5).mean()), 4),
        "specificity_hard": round(float((hard < 0.5).mean()), 4),
        "sensitivity_at_spec99": round(float((mines > at99).mean()), 4),
        "specificity_hard_at_spec99": round(float((hard <= at99).mean()), 4),
        "threshold_at_spec99": round(at99, 4),
    }


def fit(
    chips: Chips,
    sp: Split,
    *,
    epochs: int,
    seed: int,
    say: Callable[[str], None],
    jitter: float = 0.0,
    by_auc: bool = False,
) -> nn.Module:
    """A ChipNet trained on ``sp.train``; the epoch with the best balanced accuracy on
    ``sp.val`` (or, ``by_auc``, the best area under its ROC curve) is kept."""
    torch.manual_seed(seed)
    model = ChipNet()
    train, val = sp.train, sp.val
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
    best, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(order), 64):
            b = order[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(_augment(xt[b], gen, jitter)), yt[b])
            loss.backward()
            opt.step()
            sched.step()
        p_val = predict(model, chips.x[val])
        s = _scores(p_val, chips.y[val])
        balanced = (
            _auc(p_val, chips.y[val]) if by_auc else (s["sensitivity"] + s["specificity"]) / 2
        )
        say(f"seed {seed} epoch {epoch}: validation sensitivity {s['sensitivity']:.3f}, specificity {s['specificity']:.3f}")  # fmt: skip
        if balanced > best:
            best, best_state = balanced, {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    return model


@dataclass
class Benchmark:
    per_seed: list[dict[str, float]]
    ensemble: dict[str, float]
    probs: list[npt.NDArray[np.float32]]  # per seed, per chip (NaN where not held out)
    split: Split
    seconds: float


def benchmark(
    chips: Chips,
    *,
    seeds: int = 5,
    epochs: int = 12,
    jitter: float = 0.0,
    by_auc: bool = False,
    say: Callable[[str], None] = print,
) -> Benchmark:
    """Train ``seeds`` models on the benchmark split; every figure on held-out chips."""
    started = time.perf_counter()
    sp0 = split(chips, 0)
    say(
        f"chips: {len(chips.y)}; held out: {len(sp0.mines)} mines ({', '.join(v for k, v in HELDOUT.items() if 'positives' in k or 'Mineria' in k)}), "
        f"{len(sp0.random)} random negatives ({RANDOM_HELDOUT:.0%} of {RANDOM_NEGATIVES}), "
        f"{len(sp0.hard)} hard negatives (Acre, Bolivian riverbanks); training "
        f"{len(sp0.train)} + {len(sp0.val)} early stopping"
    )  # fmt: skip
    per_seed, probs = [], []
    for seed in range(seeds):
        sp = split(chips, seed)
        model = fit(chips, sp, epochs=epochs, seed=seed, say=say, jitter=jitter, by_auc=by_auc)
        held = np.concatenate([sp.mines, sp.random, sp.hard])
        prob = np.full(len(chips.y), np.nan, np.float32)  # only held-out chips are scored
        prob[held] = predict(model, chips.x[held], tta=True)
        probs.append(prob)
        per_seed.append(figures(prob, sp))
        say(f"seed {seed}: {per_seed[-1]}")
    ensemble = figures(np.mean(probs, axis=0).astype(np.float32), sp0)
    return Benchmark(per_seed, ensemble, probs, sp0, round(time.perf_counter() - started, 1))


def table(b: Benchmark) -> str:
    """The benchmark as a Markdown table: mean ± standard deviation over seeds, the
    ensemble, and Amazon Mining Watch's published figures."""
    keys = [
        ("sensitivity", "sensitivity (held-out mines), threshold 0.5"),
        ("specificity_random", "specificity, random negatives, threshold 0.5"),
        ("specificity_hard", "specificity, hard negatives, threshold 0.5"),
        ("sensitivity_at_spec99", "sensitivity at specificity 0.99 on random negatives"),
        ("specificity_hard_at_spec99", "specificity, hard negatives, at that threshold"),
    ]
    amw = {"sensitivity": "0.895", "specificity_random": "0.994"}
    rows = [f"| figure | {len(b.per_seed)} seeds, mean ± sd | ensemble | AMW (Venezuela held out) |", "|---|---|---|---|"]  # fmt: skip
    for key, name in keys:
        v = np.array([s[key] for s in b.per_seed])
        rows.append(f"| {name} | {v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f} | {b.ensemble[key]:.3f} | {amw.get(key, '')} |")  # fmt: skip
    return "\n".join(rows)


def roc_png(b: Benchmark, chips: Chips, path: Path) -> Path:
    """ROC curves (mines against random negatives, and against hard negatives), one
    thin line per seed and the ensemble bold, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(p_pos: npt.NDArray[np.float32], p_neg: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:  # fmt: skip
        t = np.unique(np.concatenate([p_pos, p_neg, [np.inf]]))[::-1]
        tpr = np.array([(p_pos >= x).mean() for x in t])
        fpr = np.array([(p_neg >= x).mean() for x in t])
        return fpr, tpr

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    sp = b.split
    for ax, negs, title in ((axes[0], sp.random, "held-out random negatives"), (axes[1], sp.hard, "held-out hard negatives (Acre, riverbanks)")):  # fmt: skip
        for i, p in enumerate(b.probs):
            fpr, tpr = curve(p[sp.mines], p[negs])
            ax.plot(fpr, tpr, lw=0.8, alpha=0.6, label=f"seed {i}")
        ens = np.mean(b.probs, axis=0)
        fpr, tpr = curve(ens[sp.mines], ens[negs])
        ax.plot(fpr, tpr, lw=2.2, color="black", label="ensemble")
        ax.axvline(0.01, color="grey", ls=":", lw=1)
        if "random" in title:
            ax.plot([0.006], [0.895], marker="*", ms=12, color="#b2182b", ls="", label="AMW (0.895 at 0.994)")  # fmt: skip
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"mines ({len(sp.mines)}) vs {title} ({len(negs)})", fontsize=9)
        ax.set_xlabel("false positive rate (1 - specificity); linear below 0.01")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("sensitivity (held-out mines)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("RGB chip classifier, held-out regions (ml/chips.py)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="RGB chip classifier with regions held out")
    ap.add_argument("--chips", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=0, help="run the benchmark with this many seeds")
    ap.add_argument("--roc", type=Path, default=None, help="benchmark: save the ROC curves here")
    ap.add_argument("--jitter", type=float, default=0.0, help="brightness/gain augmentation")
    ap.add_argument("--by-auc", action="store_true", help="early stopping on validation AUC")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.seeds:
        chips = load_chips(args.chips)
        b = benchmark(
            chips, seeds=args.seeds, epochs=args.epochs, jitter=args.jitter, by_auc=args.by_auc
        )
        print(table(b))
        print(f"trained and evaluated {args.seeds} seeds in {b.seconds} s")
        if args.roc is not None:
            print(f"ROC curves: {roc_png(b, chips, args.roc)}")
        return 0
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
