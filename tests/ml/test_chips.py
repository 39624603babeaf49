"""The RGB chip classifier's data and protocol on the real AMW chips (skips without them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


def test_benchmark_split_holds_out_regions_and_random_negatives() -> None:
    from ml.chips import RANDOM_NEGATIVES, split

    chips = load_chips(shared("chips"))
    a, b = split(chips, 0), split(chips, 1)
    # The held-out sets are fixed; only the early-stopping draw changes with the seed.
    for name in ("mines", "random", "hard"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.val, b.val)
    assert (len(a.mines), len(a.random), len(a.hard)) == (432, 300, 759)
    assert (chips.y[a.mines] == 1).all() and (chips.y[a.random] == 0).all()
    assert (chips.y[a.hard] == 0).all()
    assert all(RANDOM_NEGATIVES in chips.gallery[i] for i in a.random)
    seen = np.concatenate([a.train, a.val])
    held = np.concatenate([a.mines, a.random, a.hard])
    assert len(np.intersect1d(seen, held)) == 0 and len(seen) + len(held) == len(chips.y)
    # No chip of a held-out campaign trains; 700 random negatives do.
    assert not any(any(k in chips.gallery[i] for k in HELDOUT) for i in seen)
    assert sum(RANDOM_NEGATIVES in chips.gallery[i] for i in seen) == 700
    # Training sees each of its random negatives RANDOM_REPEAT times, everything else
    # once, and still nothing held out.
    from ml.chips import RANDOM_REPEAT, training_order

    order = training_order(chips, a)
    ids, times = np.unique(order, return_counts=True)
    assert np.array_equal(ids, a.train) and RANDOM_REPEAT > 1
    rand = np.array([RANDOM_NEGATIVES in chips.gallery[i] for i in ids])
    assert (times[rand] == RANDOM_REPEAT).all() and (times[~rand] == 1).all()
    assert len(order) == len(a.train) + (RANDOM_REPEAT - 1) * int(rand.sum())
    # The registered product trains as the benchmark does (docs/detection.md says why).
    from ml.chips import PRODUCT_RANDOM_REPEAT

    assert np.array_equal(training_order(chips, a, PRODUCT_RANDOM_REPEAT), order)


def test_benchmark_figures_read_the_right_chips() -> None:
    from ml.chips import Split, figures

    idx = np.arange
    sp = Split(idx(0), idx(0), mines=idx(0, 10), random=idx(10, 110), hard=idx(110, 130))
    prob = np.zeros(130, np.float32)
    prob[:8] = 0.9  # 8 of 10 mines found at 0.5
    prob[8:10] = 0.3  # 2 below 0.5, above every random negative but one
    prob[10] = 0.4  # the highest random negative: the 0.99 quantile
    prob[110:115] = 0.6  # 5 of 20 hard negatives fire at 0.5
    f = figures(prob, sp)
    assert f["sensitivity"] == 0.8 and f["specificity_random"] == 1.0
    assert f["specificity_hard"] == 0.75
    assert f["threshold_at_spec99"] == pytest.approx(0.4)
    assert f["sensitivity_at_spec99"] == 0.8  # 0.3 is not above 0.4
    assert f["specificity_hard_at_spec99"] == 0.75


def test_the_ceiling_counts_the_mines_no_model_finds(tmp_path: Path) -> None:
    """Each member at its own specificity-0.99 threshold: a mine found by one member is
    found; the union is the oracle's figure, its false alarms are counted, and the
    misses are named per campaign."""
    from PIL import Image

    from ml.chips import Benchmark, Split, ceiling, describe_ceiling, missed_png

    idx = np.arange
    sp = Split(idx(0), idx(0), mines=idx(0, 10), random=idx(10, 210), hard=idx(210, 220))
    gallery = ["BD_MineriaAurifera_Peru.png"] * 6 + ["punino_positives.png"] * 4 + ["n"] * 210
    y = np.r_[np.ones(10, np.int64), np.zeros(210, np.int64)]
    chips = Chips(np.random.default_rng(0).integers(0, 255, (220, 3, 48, 48), np.uint8), y, gallery)  # fmt: skip
    a = np.zeros(220, np.float32)
    a[10:210] = np.linspace(0, 0.5, 200)  # threshold: the second highest (200 negatives)
    b = np.zeros(220, np.float32)
    b[10:210] = np.linspace(0, 0.2, 200)
    b[10] = 0.3  # b's top random negative is another chip than a's: 0.2 is its threshold
    a[[0, 1, 2, 3]] = 0.9  # a finds mines 0-3
    b[[0, 1, 4, 6]] = 0.9, 0.9, 0.25, 0.25  # b finds 4 and 6 (0.25 would not pass a's)
    bench = Benchmark([], {}, [a, b], sp, 0.0)
    c = ceiling(bench, chips)
    assert c.members == 2 and c.found_by_any == 0.6
    assert c.flagged_by_any == 0.01  # each flags its own top negative: 2 of 200
    assert c.missed.tolist() == [5, 7, 8, 9]
    peru, punino = (c.per_campaign[label] for label in ("Peru (curated mines, 2024)", "Ecuador, Puñino (mines, 2025)"))  # fmt: skip
    assert peru[:2] == (1, 6) and punino[:2] == (3, 4)
    assert "found by at least one of the 2 models" in describe_ceiling(c)
    assert "3 of 4 missed by all" in describe_ceiling(c) and "flag 0.010" in describe_ceiling(c)
    bench.hybrid_probs = [np.where(idx(220) == 9, 0.99, a).astype(np.float32)]
    assert ceiling(bench, chips).missed.tolist() == [5, 7, 8]  # a hybrid member counts too
    png = missed_png(c, chips, tmp_path / "missed.png")
    assert Image.open(png).size == (16 * 50 * 2, (2 * 50 + 2 * 14) * 2)


def test_the_product_threshold_holds_both_specificities_on_validation() -> None:
    """The lowest threshold with specificity 0.99 on the validation's random landscape
    negatives and 0.90 on its other negatives; a missing kind is named in the rule, no
    negatives at all is an error."""
    from ml.chips import product_threshold

    rand = np.linspace(0.0, 0.5, 100, dtype=np.float32)  # q99: 0.5 (the highest, "higher")
    other = np.linspace(0.0, 0.9, 10, dtype=np.float32)  # q90: 0.9 (the 10th of 10)
    mines = np.full(5, 0.95, np.float32)
    p = np.concatenate([rand, other, mines])
    y = np.array([0] * 110 + [1] * 5)
    random = np.array([True] * 100 + [False] * 15)
    thr, rule = product_threshold(p, y, random)
    assert thr == pytest.approx(0.9)
    assert "0.99 on the 100 random landscape" in rule and "0.9 on the 10 other" in rule
    p[100:110] = 0.1  # the other negatives low: the landscape decides
    assert product_threshold(p, y, random)[0] == pytest.approx(0.5)
    thr, rule = product_threshold(p[:100], y[:100], random[:100])
    assert thr == pytest.approx(0.5) and "no other validation negatives" in rule
    with pytest.raises(ValueError, match="no validation negatives"):
        product_threshold(mines, np.ones(5, np.int64), np.zeros(5, bool))


def test_benchmark_runs_end_to_end_on_a_subsample(tmp_path: Path) -> None:
    from ml.chips import benchmark, roc_png, table

    chips = load_chips(shared("chips"))
    keep = np.sort(np.random.default_rng(0).choice(len(chips.y), 500, replace=False))
    sub = Chips(chips.x[keep], chips.y[keep], [chips.gallery[i] for i in keep])
    b = benchmark(sub, seeds=2, epochs=1, say=lambda _m: None)
    assert len(b.per_seed) == 2 and set(b.ensemble) == set(b.per_seed[0])
    assert (
        np.isnan(b.probs[0][b.split.train]).all() and np.isfinite(b.probs[0][b.split.mines]).all()
    )
    text = table(b)
    assert text.count("\n") == 6 and "0.895" in text and "± " in text
    # The hybrid (CNN and trees) is scored on the same held-out chips, never on others.
    assert len(b.hybrid_per_seed) == 2 and set(b.hybrid_ensemble) == set(b.ensemble)
    assert np.isnan(b.hybrid_probs[0][b.split.val]).all()
    assert np.isfinite(b.hybrid_probs[0][b.split.random]).all() and len(b.votes) == 2
    assert "hybrid (CNN + trees), 2 seeds" in text.splitlines()[0]
    alone = table(benchmark(sub, seeds=1, epochs=1, trees=False, say=lambda _m: None))
    assert "hybrid" not in alone and alone.splitlines()[1] == "|---|---|---|---|"
    from ml.chips import ceiling

    c = ceiling(b, sub)  # two CNNs and two hybrids, each at its own threshold
    assert c.members == 4 and 0 <= c.found_by_any <= 1
    assert c.found_by_any >= max(s["sensitivity_at_spec99"] for s in b.per_seed + b.hybrid_per_seed)  # fmt: skip
    png = roc_png(b, sub, tmp_path / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_auc_is_the_chance_a_mine_outranks_a_non_mine() -> None:
    from ml.chips import _auc

    y = np.array([1, 1, 0, 0])
    assert _auc(np.array([0.9, 0.8, 0.1, 0.2], np.float32), y) == 1.0
    assert _auc(np.array([0.1, 0.8, 0.9, 0.2], np.float32), y) == 0.25
    assert _auc(np.array([0.5, 0.5, 0.5, 0.5], np.float32), y) == 0.5  # ties count half


def test_chip_features_measure_colour_and_texture_wherever_they_lie() -> None:
    from ml.chips import chip_features

    rng = np.random.default_rng(0)
    forest = np.zeros((1, 3, 48, 48), np.uint8)
    forest[0, 1] = 60  # green
    pond = forest.copy()
    pond[0, :, 5:15, 30:40] = np.array([200, 120, 60])[:, None, None]  # a red-brown patch
    moved = np.roll(pond, (20, -25), axis=(2, 3))
    f = chip_features(np.concatenate([forest, pond, moved, rng.integers(0, 255, (2, 3, 48, 48), np.uint8)]))  # fmt: skip
    assert f.shape == (5, 71) and f.dtype == np.float32 and np.isfinite(f).all()
    assert not np.allclose(f[0], f[1])  # the patch is seen
    # Where it lies changes only the quarters' contrast (the last column) at most.
    assert np.allclose(f[1, :-1], f[2, :-1])


def test_the_stack_weighs_the_member_that_separates_the_classes() -> None:
    from ml.chips import stack, stacked

    rng = np.random.default_rng(1)
    y = np.array([1] * 60 + [0] * 140)
    good = np.where(y == 1, rng.uniform(0.6, 1.0, 200), rng.uniform(0.0, 0.4, 200)).astype(np.float32)  # fmt: skip
    noise = rng.uniform(0, 1, 200).astype(np.float32)
    vote = stack(good, noise, y)
    assert vote[0] > 5 * abs(vote[1])  # the informative member carries the vote
    assert stack(noise, good, y)[1] > 5 * abs(stack(noise, good, y)[0])
    p = stacked(vote, good, noise)
    assert p.dtype == np.float32 and p[y == 1].min() > p[y == 0].max()
    with pytest.raises(ValueError, match="0 mines and 140 non-mines: both are needed"):
        stack(good[60:], noise[60:], y[60:])
