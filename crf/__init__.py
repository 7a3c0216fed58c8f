"""DeepLab v1's fully connected CRF (Krähenbühl & Koltun 2011): arrays in, marginals out.

    from crf import refine, CRFParams
    marginals = refine(scores, image)            # scores (C, H, W) float logits, image H x W x 3 uint8 BGR
    labels = marginals.argmax(0)

Never imports torch.
"""
from __future__ import annotations

import numpy as np

from .features import CRFInputError, check_inputs, unary_from_scores
from .params import CRFParams

__all__ = ["refine", "refine_unary", "CRFParams", "CRFInputError", "BACKENDS"]

BACKENDS = ("numpy",)


def refine_unary(unary: np.ndarray, image: np.ndarray, params: CRFParams = CRFParams(),
                 backend: str = "auto") -> np.ndarray:
    """Mean field from unary energies (C, H, W) float32 = -log p. Returns marginals (C, H, W)."""
    unary, image = check_inputs(unary, image)
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    from .numpy_backend import mean_field

    return mean_field(unary, image, params)


def refine(scores: np.ndarray, image: np.ndarray, params: CRFParams = CRFParams(),
           backend: str = "auto") -> np.ndarray:
    """Refine network logits with the dense CRF.

    scores: (C, H, W) float logits (the upsampled network output; pass log-probabilities if you
    hold probabilities). image: H x W x 3 uint8, BGR as OpenCV loads it (the bilateral kernel uses
    the raw 0..255 colours in the order given). Returns marginals (C, H, W) float32 summing to 1
    over C. ``params.iterations`` mean-field steps; 0 returns softmax(scores).
    """
    scores, image = check_inputs(scores, image)
    return refine_unary(unary_from_scores(scores), image, params, backend)
