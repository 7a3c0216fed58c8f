"""Coarse-to-fine search of the CRF's appearance kernel, as DeepLab v1 chose its CRF parameters.

The paper fixes w2 = 3 and sigma_gamma = 3 and searches w1 in [5, 10], sigma_alpha in 50:10:100 and
sigma_beta in 3:1:10 on a subset of the validation set, coarse steps first, then finer steps around
the best. Here: a coarse grid (the paper's ranges), then a fine grid of the best point and half a
coarse step either side on each axis. The network's scores are given once per image (cached by the
caller); only the CRF runs per grid point. The parameters not searched (w2, sigma_gamma, iterations,
normalisation) are those of ``base``.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys

import numpy as np

#: The searched CRFParams fields: w1, sigma_alpha, sigma_beta.
AXES = ("bi_w", "bi_xy_std", "bi_rgb_std")
GRIDS = {
    # The paper's ranges; w1's range has no step in the paper: three values.
    "coarse": {"bi_w": (5.0, 7.5, 10.0), "bi_xy_std": tuple(float(v) for v in range(50, 101, 10)),
               "bi_rgb_std": tuple(float(v) for v in range(3, 11))},
    # The ends of the paper's ranges only: for quick runs and tests.
    "tiny": {"bi_w": (5.0, 10.0), "bi_xy_std": (50.0, 100.0), "bi_rgb_std": (3.0, 10.0)},
}


def fine_grid(coarse: dict, best: dict) -> dict:
    """Per axis: the best value and half the smallest coarse step either side (positive values only);
    an axis with one coarse value stays fixed."""
    fine = {}
    for axis in AXES:
        values = sorted(set(coarse[axis]))
        if len(values) < 2:
            fine[axis] = (best[axis],)
            continue
        half = min(b - a for a, b in zip(values, values[1:])) / 2
        fine[axis] = tuple(v for v in (best[axis] - half, best[axis], best[axis] + half) if v > 0)
    return fine


def search_crf(cached: list, num_classes: int, base, grid: dict, progress: bool = True) -> dict:
    """cached: (scores C x H x W, image H x W x 3 uint8, truth H x W) per image. Returns
    {"crf": best CRFParams.to_dict(), "mean_iou", "default_mean_iou" (``base``), "no_crf_mean_iou",
    "grid": [{axis values..., "stage", "mean_iou"}], "images"}."""
    from tqdm import tqdm

    from crf import refine

    from .metrics import confusion, mean_iou

    def score(params) -> float:
        conf = np.zeros((num_classes, num_classes), np.int64)
        for scores, image, truth in cached:
            conf += confusion(refine(scores, image, params).argmax(0).astype(np.uint8), truth, num_classes)
        return mean_iou(conf)[0]

    tried: dict = {}  # (w1, sigma_alpha, sigma_beta) -> mIoU
    rows = []
    for stage in ("coarse", "fine"):
        axes = grid if stage == "coarse" else fine_grid(grid, best)
        points = [p for p in itertools.product(*(axes[a] for a in AXES)) if p not in tried]
        for point in tqdm(points, desc=f"CRF search, {stage} grid", unit="point", file=sys.stderr,
                          disable=not progress):
            tried[point] = score(dataclasses.replace(base, **dict(zip(AXES, point))))
            rows.append({**dict(zip(AXES, point)), "stage": stage, "mean_iou": tried[point]})
        best_point = max(tried, key=lambda p: tried[p])  # the first of equals: coarse before fine
        best = dict(zip(AXES, best_point))
    base_point = tuple(getattr(base, a) for a in AXES)
    default = tried[base_point] if base_point in tried else score(base)
    no_crf = mean_iou(sum(confusion(s.argmax(0).astype(np.uint8), t, num_classes) for s, _, t in cached))[0]
    return {"crf": dataclasses.replace(base, **best).to_dict(), "mean_iou": tried[best_point],
            "default_mean_iou": default, "no_crf_mean_iou": no_crf, "grid": rows, "images": len(cached)}
