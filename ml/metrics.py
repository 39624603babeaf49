"""Segmentation metrics over labelled pixels: IoU, F1, precision, recall."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ml.features import IGNORE

PRIOR_ITERATIONS = 200  # EM steps at most; it settles in tens


def estimate_prior(prob: npt.NDArray[np.floating], trained_prior: float) -> float:
    """The share of mining among pixels whose model probabilities are ``prob``, for a
    model trained where the share was ``trained_prior``: the EM of Saerens, Latinne and
    Decaestecker (2002, "Adjusting the outputs of a classifier to new a priori
    probabilities"), which reweights the posteriors until the prior they imply is the
    prior they assume."""
    p = np.clip(np.asarray(prob, np.float64), 1e-6, 1 - 1e-6)
    prior = trained_prior
    for _ in range(PRIOR_ITERATIONS):
        a = p * prior / trained_prior
        post = a / (a + (1 - p) * (1 - prior) / (1 - trained_prior))
        new = float(post.mean())
        if abs(new - prior) < 1e-6:
            return new
        prior = new
    return prior


def confusion(
    prob: npt.NDArray[np.floating], labels: npt.NDArray[np.uint8], threshold: float = 0.5
) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of ``prob >= threshold`` against labels, skipping ``IGNORE``."""
    known = (labels != IGNORE) & np.isfinite(prob)
    pred = prob[known] >= threshold
    truth = labels[known] == 1
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    tn = int((~pred & ~truth).sum())
    return tp, fp, fn, tn


def scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    def div(a: float, b: float) -> float:
        return a / b if b else 0.0

    precision = div(tp, tp + fp)
    recall = div(tp, tp + fn)
    return {
        "iou": round(div(tp, tp + fp + fn), 4),
        "f1": round(div(2 * tp, 2 * tp + fp + fn), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "specificity": round(div(tn, tn + fp), 4),
        "pixels": tp + fp + fn + tn,
    }


def evaluate(
    prob: npt.NDArray[np.floating], labels: npt.NDArray[np.uint8], threshold: float = 0.5
) -> dict[str, float]:
    return scores(*confusion(prob, labels, threshold))


THRESHOLDS: tuple[float, ...] = tuple(round(0.2 + 0.05 * k, 2) for k in range(13))  # 0.2-0.8


def expected_threshold(
    prob: npt.NDArray[np.floating], candidates: tuple[float, ...] = THRESHOLDS
) -> tuple[float, float]:
    """The threshold with the best IoU *expected* from calibrated probabilities alone
    (a pixel of probability p is mining with chance p), and that IoU: for sparse labels,
    where every valid pixel speaks and a few hundred points would be noise."""
    p = np.asarray(prob, np.float64)
    p = p[np.isfinite(p)]
    best_t, best_iou = 0.5, -1.0
    total = float(p.sum())
    for t in candidates:
        hit = p >= t
        tp = float(p[hit].sum())
        fp = float((1 - p[hit]).sum())
        iou = round(tp / max(fp + total, 1e-12), 4)  # tp + fp + fn, fn = total - tp
        if iou > best_iou:
            best_t, best_iou = t, iou
    return best_t, best_iou


def best_threshold(
    pairs: list[tuple[npt.NDArray[np.floating], npt.NDArray[np.uint8]]],
    candidates: tuple[float, ...] = THRESHOLDS,
) -> tuple[float, float]:
    """The threshold (of ``candidates``) with the best pooled IoU, and that IoU."""
    best_t, best_iou = 0.5, -1.0
    for t in candidates:
        totals = np.zeros(4, dtype=np.int64)
        for prob, labels in pairs:
            totals += np.asarray(confusion(prob, labels, t))
        iou = scores(*(int(v) for v in totals))["iou"]
        if iou > best_iou:
            best_t, best_iou = t, iou
    return best_t, best_iou
