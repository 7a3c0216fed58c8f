"""Inputs for tests and benchmarks that need no download: photographs shipped inside scikit-image
and smooth random class scores."""
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
