"""``Segmentation``: what the Segmenter returns for one image (and the Triton client, alike)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Segmentation:
    """Result of one image. labels: H x W uint8 class ids. probabilities: C x H x W float32 (CRF
    marginals, or the network's softmax without CRF), only when asked for. timings: milliseconds
    per stage (preprocess, network, crf, postprocess, total). image: the BGR image segmented.
    scores: C x H x W float32, the network's upsampled logits (what the CRF starts from), only
    when asked for. crf_scale: 1, or the factor (< 1) by which the image was shrunk for the CRF
    because it had more than the limits' crf_max_pixels."""

    labels: np.ndarray
    probabilities: Optional[np.ndarray]
    timings: dict
    image: np.ndarray = field(repr=False)
    scores: Optional[np.ndarray] = field(default=None, repr=False)
    crf_scale: float = 1.0
