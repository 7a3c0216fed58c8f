"""Input checks and kernel features shared by every CRF backend."""
from __future__ import annotations

import numpy as np

from .params import CRFParams


class CRFInputError(ValueError):
    """Scores/image that the CRF cannot take, with the reason."""


class CRFTimeout(TimeoutError):
    """The CRF passed its deadline (``refine(..., deadline=)``) and stopped between iterations."""


def check_deadline(deadline, done: int, total: int) -> None:
    """CRFTimeout when time.monotonic() is past ``deadline`` (None: no deadline)."""
    import time

    if deadline is not None and time.monotonic() > deadline:
        raise CRFTimeout(f"the CRF passed its deadline after {done} of {total} iterations")


def check_inputs(scores: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (C, H, W) float logits and an H x W x 3 uint8 image; return contiguous copies."""
    if not isinstance(scores, np.ndarray) or scores.ndim != 3:
        raise CRFInputError(f"scores must be a (C, H, W) array, got {getattr(scores, 'shape', type(scores))}")
    if scores.shape[0] < 1:
        raise CRFInputError("scores have zero labels (C = 0)")
    if not np.issubdtype(scores.dtype, np.floating):
        raise CRFInputError(f"scores must be floating point, got {scores.dtype}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise CRFInputError(f"image must be uint8, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise CRFInputError(f"image must be H x W x 3, got {image.shape}")
    if image.shape[:2] != scores.shape[1:]:
        raise CRFInputError(f"scores are {scores.shape[1]}x{scores.shape[2]} but the image is "
                            f"{image.shape[0]}x{image.shape[1]}: they must be the same size")
    if scores.shape[1] == 0 or scores.shape[2] == 0:
        raise CRFInputError(f"zero-size input {scores.shape}")
    # Checked after the cast: the kernels see float32, and a finite float64 beyond float32's
    # range becomes inf there (then NaN marginals).
    with np.errstate(over="ignore"):
        scores32 = np.ascontiguousarray(scores, np.float32)
    finite = np.isfinite(scores32)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        if scores.dtype != np.float32 and np.isfinite(scores).all():
            raise CRFInputError(f"scores contain {bad} values beyond float32's range (|x| > 3.4e38), "
                                f"which overflow to inf in float32")
        raise CRFInputError(f"scores contain {bad} NaN/inf values")
    return scores32, np.ascontiguousarray(image)


def unary_from_scores(scores: np.ndarray) -> np.ndarray:
    """-log softmax over the label axis of (C, H, W) logits, float32 (DeepLab's unary)."""
    s = scores.astype(np.float32)
    m = s.max(axis=0, keepdims=True)
    lse = np.log(np.exp(s - m).sum(axis=0, keepdims=True)) + m
    return (lse - s).astype(np.float32)


def spatial_features(h: int, w: int, params: CRFParams) -> np.ndarray:
    """(H*W, 2) features (x/sigma_gamma, y/sigma_gamma), pixel index y*W + x (pydensecrf order)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = np.float32(params.pos_xy_std)
    return np.stack([xx.ravel() / s, yy.ravel() / s], axis=1)


def bilateral_features(image: np.ndarray, params: CRFParams) -> np.ndarray:
    """(H*W, 5) features (x/sa, y/sa, c0/sb, c1/sb, c2/sb), channels in the order given (BGR)."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sa, sb = np.float32(params.bi_xy_std), np.float32(params.bi_rgb_std)
    c = image.reshape(-1, 3).astype(np.float32) / sb
    return np.concatenate([(xx.ravel() / sa)[:, None], (yy.ravel() / sa)[:, None], c], axis=1)


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Softmax along axis 1 of (N, C) float32, as densecrf's expAndNormalize."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
