"""The peak-memory model of one Segmenter call, checked before anything large is allocated.

For an H x W image (N pixels), C classes, the network run on P padded pixels (at most about
(max_size + 8)^2: larger images are shrunk for it) and the CRF on Nc pixels (N, or at most
crf_max_pixels: larger images run it on a shrunken copy), the arrays the Segmenter itself holds at
its peak, in bytes:

    image        3N            the decoded BGR image (kept in the result)
    network      6P + 8CP      padded input (and its shrunken copy), float32 scores and their crop
    crf          B(Nc) + 8C·Nc + 3Nc
                               the CRF's buffers (crf_buffer_bytes), its input scores and output
                               marginals, the image at the CRF's size
    full-size    3·STRIP_BYTES the strips that take the labels to full size (runtime/upsample.py)
    outputs      N             labels; + 4CN with return_probabilities, + 4CN with return_scores

Not in the model: the network runtime's own memory (ONNX Runtime's or TensorRT's activations:
constant for a model at a given max_size, measured by benchmarks/memory_bench.py), the file's
bytes while it is decoded, and the process itself (Python, numpy, OpenCV, the runtime's libraries).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .upsample import STRIP_BYTES

#: Bytes the CRF's own buffers may take before it runs on a shrunken copy (see crf_max_pixels).
CRF_MEMORY_BUDGET = 1.5e9
#: Default bound of the modelled peak of one image's segmentation (Segmenter(memory_budget=)):
#: a 100 MP image (the default max_pixels) with 21 classes and the CRF models at ~2.2 GB.
DEFAULT_MEMORY_BUDGET = 2.5e9


def _buffer_bytes(pixels: float, s: int, m_s: float, m_b: float) -> float:
    """The formula of docs/crf.md for the CRF's buffers: label rows of s floats (the GPU's layout), m_s /
    m_b spatial and bilateral lattice vertices, the hash table at its largest (4 pow2(3N/4) <= 6N)
    and the GPU's extra terms (fixed-point sums 8S·M_max, the uploaded image 3N)."""
    m_max = max(m_s, m_b)
    return (8 * s + 236 + 6 + 3) * pixels + m_s * (28 + 8 * s) + m_b * (52 + 8 * s) + 8 * m_max + 8 * s * m_max


def crf_bytes_per_pixel(num_classes: int) -> float:
    """CRF buffers per pixel with lattice vertices ~ N/5 per kernel, as on photographs at
    DeepLab's bandwidths: ~530 bytes with 21 classes (what the default crf_max_pixels is sized by)."""
    return _buffer_bytes(1, num_classes, 0.2, 0.2)


def default_crf_max_pixels(num_classes: int) -> int:
    """Largest image (pixels) the CRF runs on at full size within CRF_MEMORY_BUDGET."""
    return int(CRF_MEMORY_BUDGET // crf_bytes_per_pixel(num_classes))


def lattice_vertices(pixels: int, pos_xy_std: float, bi_xy_std: float) -> tuple:
    """Estimated (spatial, bilateral) lattice vertices of the CRF on an image of ``pixels``.
    Spatial: 1.2 N / pos_xy_std^2, as measured (0.13 N at 3 px, 0.68 N at 1.3 px, 1.8 N at 0.8 px),
    at most 3 N (each pixel touches d + 1 = 3 vertices). Bilateral: N/5 on photographs at DeepLab's
    50 px, growing as the spatial bandwidth shrinks (measured: about as its -0.8th power), at most 6 N."""
    spatial = min(3.0 * pixels, 1.2 * pixels / pos_xy_std ** 2)
    bilateral = min(6.0 * pixels, 0.2 * pixels * max(1.0, 50.0 / bi_xy_std) ** 0.8)
    return spatial, bilateral


def crf_buffer_bytes(pixels: int, num_classes: int, pos_xy_std: float = 3.0, bi_xy_std: float = 50.0) -> float:
    """The CRF's buffers on an image of ``pixels`` (_buffer_bytes), with lattice_vertices' estimate
    of the vertices for the given bandwidths."""
    return _buffer_bytes(pixels, num_classes, *lattice_vertices(pixels, pos_xy_std, bi_xy_std))


def crf_size(height: int, width: int, num_classes: int, max_pixels: int, pos_xy_std: float, bi_xy_std: float,
             budget: float | None = None) -> tuple:
    """(height, width) the CRF runs at: the image's own when it has at most max_pixels, else shrunk
    (aspect kept, rounded down) to at most max_pixels; with ``budget`` (bytes), shrunk further until
    crf_buffer_bytes at the bandwidths scaled alike fits it (a smaller copy has a denser spatial
    lattice: its vertex count barely falls as the image shrinks)."""
    n = height * width
    if n <= max_pixels:
        return height, width

    def size(f: float) -> tuple:
        return max(1, int(height * f)), max(1, int(width * f))

    def fits(f: float) -> bool:
        h, w = size(f)
        scale = math.sqrt(h * w / n)
        return crf_buffer_bytes(h * w, num_classes, pos_xy_std * scale, bi_xy_std * scale) <= budget

    hi = math.sqrt(max_pixels / n)
    if budget is None or fits(hi):
        return size(hi)
    lo = 0.0
    for _ in range(40):  # bisection on the factor; the bytes grow with it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return size(lo)


@dataclass(frozen=True)
class CallMemory:
    """Modelled peak bytes of one image's segmentation, by part (see the module's table)."""

    image: int
    network: int
    crf: int
    full_size: int
    outputs: int

    @property
    def total(self) -> int:
        return self.image + self.network + self.crf + self.full_size + self.outputs


def call_memory(height: int, width: int, num_classes: int, network_pixels: int, crf_pixels: int | None,
                crf_buffers: float = 0.0, return_probabilities: bool = False,
                return_scores: bool = False) -> CallMemory:
    """The model for one image of height x width; crf_pixels: the pixels the CRF runs on (None: no
    CRF), crf_buffers: the bytes of its buffers there (crf_buffer_bytes)."""
    n, c, p = height * width, num_classes, network_pixels
    crf = 0 if crf_pixels is None else int(crf_buffers + (8 * c + 3) * crf_pixels)
    full_size = 3 * STRIP_BYTES if n > p or crf_pixels not in (None, n) else 0
    outputs = n + 4 * c * n * (int(return_probabilities) + int(return_scores))
    return CallMemory(3 * n, 6 * p + 8 * c * p, crf, full_size, outputs)
