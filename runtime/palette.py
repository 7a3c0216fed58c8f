"""Class names, colour palettes, colour masks, overlays and indexed (VOC-style) PNG files."""
from __future__ import annotations

import json
import numbers
import struct
import zlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .image_headers import PNG_SIGNATURE
from .output_files import write_bytes_atomically

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def check_class_id(i: int, num_classes: int) -> int:
    """``i`` as a class id of a ``num_classes``-class model (numpy integers too); out of range is an
    IndexError naming the range, since a negative id would silently count from the end."""
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
        raise TypeError(f"class id must be an integer, got {type(i).__name__}")
    if not 0 <= i < num_classes:
        raise IndexError(f"class id {i} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return int(i)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (RGB, n x 3 uint8): bit-interleaved label index."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def check_palette(palette, num_classes: int) -> np.ndarray:
    """``palette`` (RGB rows) as a K x 3 uint8 array with K >= num_classes; ValueError for anything
    else: rows of unequal length, strings or other non-numbers, NaN, values outside 0..255."""
    try:
        pal = np.asarray(palette)
    except (TypeError, ValueError) as e:  # ragged rows (numpy >= 1.24 refuses them)
        raise ValueError(f"palette must be (>= {num_classes}) x 3 RGB, got rows numpy cannot stack: {e}") from e
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < num_classes:
        raise ValueError(f"palette must be (>= {num_classes}) x 3 RGB, got shape {pal.shape}")
    # Integers and floats only: numpy keeps strings, objects (older numpy's ragged rows) and bools as they are.
    if pal.dtype.kind not in "iuf":
        raise ValueError(f"palette values must be numbers 0..255, got {pal.dtype} values")
    if pal.size and not (np.isfinite(pal).all() and pal.min() >= 0 and pal.max() <= 255):
        raise ValueError("palette values must be in 0..255")
    return pal.astype(np.uint8)


def model_classes(metadata: Dict[str, str], num_classes: int, class_names: Optional[Sequence[str]] = None,
                  palette=None) -> Tuple[Tuple[str, ...], np.ndarray]:
    """(class names, RGB palette) of a model: those given, else its metadata's (JSON strings, already
    checked by parse_metadata), else VOC's (for 21 classes) or class_<i> and the VOC colour map."""
    if class_names is None:
        class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else (
            VOC_CLASSES if num_classes == len(VOC_CLASSES) else [f"class_{i}" for i in range(num_classes)])
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class model")
    if palette is None:
        palette = json.loads(metadata["palette"]) if "palette" in metadata else voc_palette(num_classes)
    return tuple(class_names), check_palette(palette, num_classes)


def colour_mask(labels: np.ndarray, palette_rgb: np.ndarray) -> np.ndarray:
    """H x W labels -> H x W x 3 uint8 BGR colour image (OpenCV order)."""
    return np.ascontiguousarray(palette_rgb[labels][:, :, ::-1])


def blend(image_bgr: np.ndarray, labels: np.ndarray, palette_rgb: np.ndarray, alpha: float = 0.5,
          skip_background: bool = True) -> np.ndarray:
    """Overlay class colours on the image; label 0 left untouched when skip_background."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if image_bgr.shape[:2] != labels.shape:
        raise ValueError(f"image {image_bgr.shape[:2]} and labels {labels.shape} differ in size")
    colours = colour_mask(labels, palette_rgb).astype(np.float32)
    out = image_bgr.astype(np.float32)
    sel = labels != 0 if skip_background else np.ones(labels.shape, bool)
    out[sel] = (1 - alpha) * out[sel] + alpha * colours[sel]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


class ClassAccessors:
    """jetson-inference segNet's accessors, shared by runtime.Segmenter and runtime.TritonSegmenter:
    a class's name and colour, a result's colour mask and overlay. The class using it sets
    ``class_names``, ``palette`` (RGB, C x 3 uint8) and ``num_classes``."""

    class_names: Sequence[str]
    palette: np.ndarray
    num_classes: int

    def class_name(self, i: int) -> str:
        return self.class_names[check_class_id(i, self.num_classes)]

    def class_color(self, i: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.palette[check_class_id(i, self.num_classes)])  # type: ignore[return-value]

    def mask(self, result) -> np.ndarray:
        """Colour mask (H x W x 3 BGR uint8) of a result (a Segmentation)."""
        return colour_mask(result.labels, self.palette)

    def overlay(self, result, alpha: float = 0.5, skip_background: bool = True) -> np.ndarray:
        """The segmented image with class colours blended in (BGR uint8)."""
        return blend(result.image, result.labels, self.palette, alpha, skip_background)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def indexed_png_bytes(labels: np.ndarray, palette_rgb: np.ndarray) -> bytes:
    """labels as an 8-bit palettised PNG file's bytes (the VOC ground-truth format), without Pillow."""
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"labels must be H x W uint8, got {labels.dtype} {labels.shape}")
    h, w = labels.shape
    pal = np.zeros((256, 3), np.uint8)
    n = min(256, len(palette_rgb))
    pal[:n] = palette_rgb[:n]

    raw = np.concatenate([np.zeros((h, 1), np.uint8), labels], axis=1).tobytes()  # filter 0 per row
    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
            + png_chunk(b"PLTE", pal.tobytes()) + png_chunk(b"IDAT", zlib.compress(raw, 6)) + png_chunk(b"IEND", b""))


def write_indexed_png(path: str | Path, labels: np.ndarray, palette_rgb: np.ndarray) -> None:
    """Write labels as an 8-bit palettised PNG (the VOC ground-truth format) without Pillow."""
    write_bytes_atomically(path, indexed_png_bytes(labels, palette_rgb))


def side_by_side(panels: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Equal-sized BGR images side by side, each captioned (top left, white on a dark band)."""
    import cv2

    h, w = panels[0][1].shape[:2]
    scale = max(0.4, min(w, h) / 500)  # legible on small images, not huge on large ones
    thick = max(1, round(scale * 2))
    out = []
    for caption, img in panels:
        img = img.copy()
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        pad = max(2, th // 3)
        band = img[: th + base + 2 * pad, : tw + 2 * pad]
        band[:] = (band * 0.4).astype(np.uint8)  # darkened, so white text reads on any image
        cv2.putText(img, caption, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
        out.append(img)
    return np.hstack(out)
