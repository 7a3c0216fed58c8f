"""``SizeLimits``: how large an image a Segmenter takes, and at what size each stage runs it.

    Segmenter("model.onnx", limits=SizeLimits(max_pixels=20_000_000, memory_budget=1e9))

docs/memory.md has the table of what each limit bounds and what it costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from crf import CRFParams

from .contract import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE, check_pixels
from .errors import ImageTooLarge
from .memory import (CRF_MEMORY_BUDGET, DEFAULT_MEMORY_BUDGET, CallMemory, call_memory, crf_buffer_bytes, crf_size,
                     default_crf_max_pixels)
from .network import SizeBounds, network_size


@dataclass(frozen=True)
class SizeLimits:
    """max_size: images with a side above it are shrunk for the network and the scores resized
    back (runtime/contract.py). input_size: (H, W) to pad every image to a fixed network size
    instead of the next 8k+1. max_batch: the most images of one padded size sent to the network at
    once. A TensorRT plan's optimisation profile bounds these too: larger images are shrunk to its
    maximum, smaller ones padded up to its minimum, max_batch capped at its batch.

    max_pixels: the largest image taken; a file whose header declares more is refused before it is
    decoded (a decompression-bomb guard). memory_budget: bound (bytes) of the modelled peak memory
    of one image's segmentation (runtime/memory.py, ``Segmenter.memory_model(h, w)``). An image over
    either raises ImageTooLarge naming its size and the limit, before anything large is allocated.

    crf_max_pixels: images with more pixels run the CRF on a copy shrunk to fit. None (the
    default): what keeps the CRF's buffers under ~1.5 GB for the model's class count (~2.8 M pixels
    with 21 classes), and the CRF's modelled buffers within that budget too; a number given is a cap
    in pixels only. A deviation from DeepLab, which always ran it at full size: the image is shrunk
    with area interpolation, the scores bilinearly, the spatial bandwidths (bi_xy_std, pos_xy_std)
    by the same factor; the marginals are resized back bilinearly and the labels are their argmax
    (``Segmentation.crf_scale`` says when it happened)."""

    max_size: int = DEFAULT_MAX_SIZE
    input_size: Optional[Tuple[int, int]] = None
    max_batch: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    memory_budget: float = DEFAULT_MEMORY_BUDGET
    crf_max_pixels: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_size < 9:
            raise ValueError(f"max_size must be >= 9, got {self.max_size}")
        if self.input_size is not None:
            size = (int(self.input_size[0]), int(self.input_size[1]))
            if min(size) < 1:
                raise ValueError(f"input_size must be positive, got {self.input_size}")
            object.__setattr__(self, "input_size", size)  # a list or numpy ints given: a tuple of ints kept
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.crf_max_pixels is not None and self.crf_max_pixels < 1:
            raise ValueError(f"crf_max_pixels must be >= 1, got {self.crf_max_pixels}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a whole number >= 1, got {self.max_pixels!r}")
        budget = self.memory_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {budget!r}")

    def crf_pixels(self, num_classes: int) -> int:
        """The most pixels the CRF runs on at full size for a model of ``num_classes``."""
        return default_crf_max_pixels(num_classes) if self.crf_max_pixels is None else self.crf_max_pixels

    def crf_size(self, height: int, width: int, num_classes: int, params: CRFParams) -> Tuple[int, int]:
        """The size the CRF runs at for a height x width image (runtime.memory.crf_size): its own, or
        shrunk to crf_pixels, and by default to what keeps its buffers in CRF_MEMORY_BUDGET."""
        budget = CRF_MEMORY_BUDGET if self.crf_max_pixels is None else None
        return crf_size(height, width, num_classes, self.crf_pixels(num_classes), params.pos_xy_std, params.bi_xy_std,
                        budget)

    def memory_model(self, height: int, width: int, num_classes: int, crf: Optional[CRFParams],
                     bounds: Optional[SizeBounds], probabilities: bool = False, scores: bool = False) -> CallMemory:
        """Modelled peak bytes of segmenting one height x width image (runtime/memory.py)."""
        size = network_size(height, width, self.max_size, bounds, self.input_size)
        crf_pixels, crf_buffers = None, 0.0
        if crf is not None:
            sh, sw = self.crf_size(height, width, num_classes, crf)
            crf_pixels = sh * sw
            scale = math.sqrt(crf_pixels / (height * width))
            crf_buffers = crf_buffer_bytes(crf_pixels, num_classes, crf.pos_xy_std * scale, crf.bi_xy_std * scale)
        return call_memory(height, width, num_classes, size.padded[0] * size.padded[1], crf_pixels, crf_buffers,
                           probabilities, scores)

    def check_image(self, height: int, width: int, source: str, memory: CallMemory, outputs: bool) -> None:
        """ImageTooLarge for an image above max_pixels or whose modelled ``memory`` exceeds
        memory_budget (outputs: return_probabilities or return_scores was asked for)."""
        check_pixels(height, width, self.max_pixels, source)
        if memory.total > self.memory_budget:
            extra = " (return_probabilities / return_scores add 4 bytes per class and pixel each)" if outputs else ""
            raise ImageTooLarge(f"{source}: segmenting {width}x{height} needs about {memory.total / 1e9:.2f} GB, above "
                                f"the memory_budget of {self.memory_budget / 1e9:.2f} GB{extra}", height * width,
                                int(self.memory_budget))
