"""Class maps to full resolution: bilinear resizing, and its argmax in bounded row strips.

A C x h x w map upsampled to a large image is C x H x W float32: 84 bytes a pixel with 21 classes,
1 GB at 12 MP. When only the labels are wanted, ``upsampled_argmax`` resizes and takes the argmax a
strip of rows at a time, so that no more than ``STRIP_BYTES`` of it exists at once. Both follow
OpenCV's INTER_LINEAR (half-pixel centres, edge rows and columns repeated): the strips give the
labels of the whole-map resize up to float rounding.
"""
from __future__ import annotations

import numpy as np

#: Bytes of float32 class rows one strip of ``upsampled_argmax`` may hold.
STRIP_BYTES = 32 << 20
#: Most channels one cv2.resize call takes (OpenCV 5's Python binding wraps at most 128).
_CHANNELS = 128


def resize_scores(scores: np.ndarray, h: int, w: int) -> np.ndarray:
    """C x h0 x w0 -> C x h x w float32, bilinear (cv2 INTER_LINEAR), in chunks of <= 128 channels (what the cv2 binding wraps)."""
    import cv2

    out = np.empty((scores.shape[0], h, w), np.float32)
    for c0 in range(0, scores.shape[0], _CHANNELS):
        part = np.ascontiguousarray(scores[c0:c0 + _CHANNELS].transpose(1, 2, 0), np.float32)
        r = cv2.resize(part, (w, h), interpolation=cv2.INTER_LINEAR)
        out[c0:c0 + _CHANNELS] = r.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def _source_rows(h0: int, h: int, y: np.ndarray):
    """For output rows y of an h0 -> h resize: the two source rows and the second one's weight."""
    fy = (y + 0.5) * (h0 / h) - 0.5
    base = np.floor(fy)
    wy = (fy - base).astype(np.float32)
    y0 = np.clip(base.astype(np.int64), 0, h0 - 1)
    y1 = np.clip(base.astype(np.int64) + 1, 0, h0 - 1)
    return y0, y1, wy


def upsampled_argmax(scores: np.ndarray, h: int, w: int, strip_bytes: int = STRIP_BYTES) -> np.ndarray:
    """argmax over classes of ``resize_scores(scores, h, w)`` as h x w uint8, without ever holding
    more than about ``strip_bytes`` of the resized map (plus the source rows of one strip)."""
    import cv2

    c, h0, w0 = scores.shape
    if c > 256:
        raise ValueError(f"{c} classes: labels are uint8, at most 256")
    labels = np.empty((h, w), np.uint8)
    rows = max(1, min(h, strip_bytes // (4 * c * w)))
    for r0 in range(0, h, rows):
        y = np.arange(r0, min(h, r0 + rows))
        y0, y1, wy = _source_rows(h0, h, y)
        lo, hi = int(y0.min()), int(y1.max()) + 1
        # Columns first, with OpenCV itself (same height: its vertical weights are 1 and 0), on
        # only the source rows this strip reads; then the rows, blended here.
        src = np.ascontiguousarray(scores[:, lo:hi].transpose(1, 2, 0), np.float32)
        wide = np.empty((hi - lo, w, c), np.float32)
        for c0 in range(0, c, _CHANNELS):
            part = cv2.resize(src[:, :, c0:c0 + _CHANNELS], (w, hi - lo), interpolation=cv2.INTER_LINEAR)
            wide[:, :, c0:c0 + _CHANNELS] = part.reshape(hi - lo, w, -1)
        top = wide[y0 - lo]
        top *= (1 - wy)[:, None, None]
        bottom = wide[y1 - lo]
        bottom *= wy[:, None, None]
        top += bottom
        del bottom
        labels[r0:r0 + len(y)] = top.argmax(axis=2)
    return labels
