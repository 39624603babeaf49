"""What the screening detector costs per Mpx (issue 19, item 4): ``ml.chips.screen`` over
a mosaic of real AMW chips (``--grid`` x ``--grid`` chips of 48 px), rendered as a
composite would be, with the product's shapes side by side in the same process:

- ``5 CNNs``: the ensemble the product registers with ``--seeds 5`` (the baseline);
- ``1 CNN``: ``--seeds 1``;
- ``1 CNN + trees``: ``--seeds 1 --trees``, a ``Hybrid`` (the CNN, ``chip_features`` of
  every window and LightGBM's 400 trees).

The CNNs' weights are untrained (time does not depend on them); the trees are fitted on
the benchmark's training chips, as the product's are, because their depth does. Best of
``--repeats`` runs each, on ``torch.get_num_threads()`` threads (2 here).

Run: ``.venv/bin/python bench/screening.py [--grid 21] [--repeats 2]`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.chips import (
    CHIP,
    DEFAULT_DIR,
    Ensemble,
    Hybrid,
    chip_features,
    fit_trees,
    load_chips,
    screen,
    split,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--grid", type=int, default=21, help="chips per side (21: 1008 px, 1.02 Mpx)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.chips.exists():
        raise SystemExit(f"no chips at {args.chips}: the benchmark reads ../shared/data/chips")
    torch.manual_seed(0)
    chips = load_chips(args.chips)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(chips.y), args.grid * args.grid, replace=False)
    size = args.grid * CHIP
    img = (
        chips.x[picks].reshape(args.grid, args.grid, 3, CHIP, CHIP).transpose(2, 0, 3, 1, 4)
        .reshape(3, size, size).astype(np.float32) / 255.0
    )  # fmt: skip
    mpx = size * size / 1e6
    t = time.perf_counter()
    forest = fit_trees(chips, split(chips, 0), 0, chip_features(chips.x))
    print(f"trees fitted in {time.perf_counter() - t:.1f} s (not timed below)")
    hybrid = Hybrid(1, forest.model_to_string(), [0.6, 0.4, 0.0])
    shapes = {"5 CNNs": Ensemble(5), "1 CNN": Ensemble(1), "1 CNN + trees": hybrid}
    stride = 24
    windows = ((size - CHIP) // stride + 1) ** 2
    print(
        f"{size} x {size} px ({mpx:.2f} Mpx) of {len(picks)} real chips, {windows} windows of "
        f"{CHIP} px at stride {stride}; {torch.get_num_threads()} torch threads"
    )
    best: dict[str, float] = {}
    for name, model in shapes.items():
        model.eval()
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = screen(model, img, stride)
            runs.append(time.perf_counter() - t)
        assert np.isfinite(out).all()
        best[name] = min(runs)
        print(f"{name}: {', '.join(f'{r:.2f}' for r in runs)} s; best {best[name] / mpx:.2f} s/Mpx")
    base = best["5 CNNs"]
    print("\n| detector | s per Mpx | against 5 CNNs |\n|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s / mpx:.2f} | {s / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
