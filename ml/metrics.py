"""Segmentation metrics over labelled pixels: IoU, F1, precision, recall."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ml.features import IGNORE


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
