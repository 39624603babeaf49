"""The RGB chip classifier's data and protocol on the real AMW chips (skips without them)."""

from __future__ import annotations

import numpy as np

from ml.chips import HELDOUT, Chips, heldout_mask, load_chips, train_and_evaluate
from tests.conftest import shared


def test_real_chips_load_and_regions_are_held_out() -> None:
    chips = load_chips(shared("chips"))
    assert chips.x.shape == (4760, 3, 48, 48) and int(chips.y.sum()) == 2255
    held = heldout_mask(chips)
    # The curated Peru (188) and Puñino (244) mines, the Acre (719) and Bolivian
    # riverbank (40) negatives: whole campaigns, none of them seen in training.
    assert int(held.sum()) == 188 + 244 + 719 + 40 and int(chips.y[held].sum()) == 432
    assert {g for g, h in zip(chips.gallery, held, strict=True) if h} == {
        g for g in set(chips.gallery) if any(k in g for k in HELDOUT)
    }
    assert chips.x.reshape(len(chips.y), -1).std(axis=1).min() > 0, "no empty chip was cut"


def test_protocol_runs_on_a_subsample() -> None:
    chips = load_chips(shared("chips"))
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(chips.y), 600, replace=False))
    sub = Chips(chips.x[keep], chips.y[keep], [chips.gallery[i] for i in keep])
    res = train_and_evaluate(sub, epochs=1, say=lambda _m: None)
    h = res["heldout"]
    assert isinstance(h, dict) and 0 <= h["sensitivity"] <= 1 and 0 <= h["specificity"] <= 1
    assert h["positives"] + h["negatives"] == int(heldout_mask(sub).sum())
