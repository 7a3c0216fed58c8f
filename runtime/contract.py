"""The one pre/post-processing contract shared by export and runtime (numpy only, no torch).

DeepLab v1 (released Caffe code) feeds the network an OpenCV BGR image in 0..255 minus a
per-channel mean, padded bottom/right with the mean pixel, and upsamples the stride-8 score map
bilinearly with align-corners sampling before cropping the top-left H x W.

Our exported graph takes the *raw* uint8 image, NHWC, BGR, and does the mean subtraction and the
upsampling inside the graph, so the runtime only has to validate, pad and crop.

Size policy:
- An image is padded bottom/right to the next size of the form 8k+1 (which keeps the stride-8 grid
  aligned with the align-corners upsampling), or to a fixed ``input_size`` when one is given.
- An image larger than ``max_size`` on either side is first shrunk (area interpolation, aspect
  ratio kept) to fit, the network runs on the shrunken copy, and the class scores are resized
  bilinearly back to the original size; the CRF then runs at the original resolution.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import numpy as np

#: Per-channel mean of the released DeepLab models, in B, G, R order.
MEAN_BGR = (104.008, 116.669, 122.675)
#: The mean as the uint8 pixel used for padding the raw image (the graph subtracts MEAN_BGR).
PAD_PIXEL_BGR = tuple(int(round(m)) for m in MEAN_BGR)
#: Output stride of DeepLab v1 (LargeFOV, 4x4 and 7x7 heads alike).
OUTPUT_STRIDE = 8
#: Default largest side the network is run at; larger images are shrunk first (see module doc).
DEFAULT_MAX_SIZE = 1025

ImageLike = Union[np.ndarray, str, Path]


class ImageError(ValueError):
    """An input image that cannot be segmented, with the reason."""


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 BGR (OpenCV order)."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ImageError(f"image file not found: {p}")
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f"cannot decode image file (corrupt or not an image): {p}")
    return as_bgr_uint8(img, source=str(p))


def as_bgr_uint8(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Validate an array and convert it to contiguous H x W x 3 uint8 BGR.

    Grayscale (H x W or H x W x 1) is replicated to three channels; BGRA has its alpha dropped
    (DeepLab never saw transparency). Other dtypes are refused rather than guessed at: a float image
    in 0..1 and one in 0..255 look alike, and a silent wrong guess gives a silently wrong mask.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{source}: expected a numpy array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(
            f"{source}: expected dtype uint8 (0..255 BGR), got {image.dtype}; "
            "convert explicitly, e.g. (img * 255).round().astype(np.uint8) for floats in 0..1"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ImageError(
            f"{source}: expected H x W x 3 BGR (or grayscale / BGRA), got shape {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{source}: zero-size image {image.shape}")
    return np.ascontiguousarray(image)


def aligned_size(n: int) -> int:
    """Smallest size of the form 8k+1 that is >= n."""
    return int(math.ceil((n - 1) / OUTPUT_STRIDE)) * OUTPUT_STRIDE + 1 if n > 1 else 1


def fit_scale(height: int, width: int, max_size: int) -> float:
    """Factor (<= 1) that makes both sides fit in max_size."""
    return min(1.0, max_size / max(height, width))


def pad_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an H x W x 3 uint8 BGR image bottom/right with the mean pixel to height x width."""
    h, w = image.shape[:2]
    if h > height or w > width:
        raise ImageError(f"image {h}x{w} is larger than the network input {height}x{width}")
    if (h, w) == (height, width):
        return image
    out = np.empty((height, width, 3), np.uint8)
    out[...] = np.asarray(PAD_PIXEL_BGR, np.uint8)
    out[:h, :w] = image
    return out
