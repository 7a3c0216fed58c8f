"""Mean-field inference in numpy on the permutohedral lattice (the portable CPU backend)."""
from __future__ import annotations

import numpy as np

from .features import bilateral_features, check_deadline, softmax_rows, spatial_features
from .lattice import PermutohedralLattice
from .params import CRFParams


class _Kernel:
    """One Gaussian kernel with its lattice and normaliser, built once per image."""

    def __init__(self, features: np.ndarray, weight: float, normalization: str):
        self.lattice = PermutohedralLattice(features)
        # In double, as densecrf computes it: 1/(n + 1e-20) or 1/sqrt(n + 1e-20), stored as float.
        norm = self.lattice.filter(np.ones((features.shape[0], 1), np.float32))[:, 0].astype(np.float64) + 1e-20
        self.norm = (1.0 / (np.sqrt(norm) if normalization == "symmetric" else norm)).astype(np.float32)[:, None]
        self.symmetric = normalization == "symmetric"
        self.weight = np.float32(weight)

    def message(self, q: np.ndarray) -> np.ndarray:
        """w * normalised K q (Potts: the compatibility is -w, subtracted in the update)."""
        x = q * self.norm if self.symmetric else q
        return self.weight * (self.lattice.filter(x) * self.norm)


def mean_field(unary: np.ndarray, image: np.ndarray, params: CRFParams, deadline: float | None = None) -> np.ndarray:
    """unary (C, H, W) float32 -log p, image H x W x 3 uint8 -> marginals (C, H, W) float32.
    deadline: time.monotonic() value checked before each iteration (CRFTimeout past it)."""
    c, h, w = unary.shape
    u = np.ascontiguousarray(unary.reshape(c, h * w).T)  # (N, C)
    q = softmax_rows(-u)
    if params.iterations > 0:
        kernels = [
            _Kernel(spatial_features(h, w, params), params.pos_w, params.normalization),
            _Kernel(bilateral_features(image, params), params.bi_w, params.normalization),
        ]
        for i in range(params.iterations):
            check_deadline(deadline, i, params.iterations)
            t = -u
            for k in kernels:
                t = t + k.message(q)
            q = softmax_rows(t)
    return np.ascontiguousarray(q.T.reshape(c, h, w))
