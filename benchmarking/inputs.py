"""Inputs for benchmarks and tests that need no download: photographs shipped inside scikit-image,
smooth random class scores, and pydensecrf2's marginals as the CRF's oracle."""
from __future__ import annotations

import numpy as np


def photo(name: str, width: int | None = None, height: int | None = None) -> np.ndarray:
    """A scikit-image sample photograph as BGR uint8, resized to width (and height, if given)."""
    import cv2
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3][:, :, ::-1])
    if width is not None:
        h = height or round(img.shape[0] * width / img.shape[1])
        img = cv2.resize(img, (width, h), interpolation=cv2.INTER_AREA)
    return img


def smooth_logits(h: int, w: int, c: int, seed: int = 0, scale: float = 3.0, cell: int = 16) -> np.ndarray:
    """Spatially smooth random logits (C, H, W) float32, like upsampled network scores."""
    import cv2

    rng = np.random.default_rng(seed)
    lo = rng.normal(0, scale, (c, h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.stack([cv2.resize(l, (w, h), interpolation=cv2.INTER_LINEAR) for l in lo]).astype(np.float32)


def pydensecrf_marginals(unary: np.ndarray, image: np.ndarray, params) -> np.ndarray:
    """The oracle: pydensecrf2 with the same parameters and normalisation as ``params`` (a CRFParams),
    kernels added in the same order as ours. unary (C, H, W) float32 = -log p, image H x W x 3 uint8
    (channels in the order given). Raises ImportError when pydensecrf2 is not installed."""
    import pydensecrf.densecrf as dcrf

    c, h, w = unary.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1), np.float32))
    norm = dcrf.NORMALIZE_AFTER if params.normalization == "after" else dcrf.NORMALIZE_SYMMETRIC
    d.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w, normalization=norm)
    d.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=np.ascontiguousarray(image),
                           compat=params.bi_w, normalization=norm)
    return np.array(d.inference(params.iterations)).reshape(c, h, w)
