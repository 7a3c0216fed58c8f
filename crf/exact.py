"""Exact O(N^2) mean field with dense Gaussian kernels: the ground truth for tiny images.

Same energy as the lattice backends, with the Gaussian sums computed exactly instead of on the
permutohedral lattice. Memory is N^2 floats: meant for images of a few thousand pixels.
"""
from __future__ import annotations

import numpy as np

from .features import bilateral_features, softmax_rows, spatial_features
from .params import CRFParams

MAX_PIXELS = 6000


def gaussian_matrix(features: np.ndarray) -> np.ndarray:
    f = features.astype(np.float64)
    sq = (f * f).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0)
    return np.exp(-0.5 * d2)


def exact_mean_field(unary: np.ndarray, image: np.ndarray, params: CRFParams) -> np.ndarray:
    c, h, w = unary.shape
    if h * w > MAX_PIXELS:
        raise ValueError(f"exact mean field is O(N^2): {h * w} pixels is more than {MAX_PIXELS}")
    u = unary.reshape(c, h * w).T.astype(np.float64)
    q = softmax_rows(-u)
    ops = []
    for feats, weight in ((spatial_features(h, w, params), params.pos_w),
                          (bilateral_features(image, params), params.bi_w)):
        k = gaussian_matrix(feats)
        norm = k.sum(axis=1)
        if params.normalization == "symmetric":
            s = 1 / np.sqrt(norm)
            ops.append(weight * (s[:, None] * k * s[None, :]))
        else:
            ops.append(weight * (k / norm[:, None]))
    op = sum(ops) if ops else None
    for _ in range(params.iterations):
        q = softmax_rows(-u + op @ q)
    return q.T.reshape(c, h, w).astype(np.float32)
