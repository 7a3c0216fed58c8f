"""Segmentation scores from a confusion matrix (rows: true class, columns: predicted class)."""
from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    """n x n pixel counts of (true class, predicted class). Truth values >= n (255: not labelled,
    and values outside the class range) are left out."""
    t = truth.astype(np.int64).ravel()
    keep = t < n
    return np.bincount(t[keep] * n + labels.ravel()[keep], minlength=n * n).reshape(n, n)


def mean_iou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean IoU, per-class IoU); a class absent from both truth and predictions has no IoU (NaN)
    and is left out of the mean."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"), iou


def scores(conf: np.ndarray, class_names) -> dict:
    """mean_iou, per_class_iou (null where a class has no IoU: NaN is not JSON), pixel_accuracy,
    and the confusion matrix itself, as JSON-ready values."""
    miou, iou = mean_iou(conf)
    return {"mean_iou": miou,
            "per_class_iou": dict(zip(class_names, (None if np.isnan(v) else v for v in iou.tolist()))),
            "pixel_accuracy": float(np.trace(conf) / max(int(conf.sum()), 1)),
            "confusion": conf.tolist()}
