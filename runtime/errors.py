"""The exceptions a user of the runtime catches, in one place.

    ValueError
        ImageError            an input image that cannot be segmented (unreadable, cut short, ...)
            ImageTooLarge     above max_pixels or the memory_budget, refused before it is decoded
        ModelFormatError      a model file that is not one of this toolkit's DeepLab graphs
            SidecarError      a TensorRT plan's sidecar that cannot be read or is not about our plan
        NetworkOutputError    NaN/inf scores from the network for one image
    RuntimeError
        EngineMismatch        a plan built for another TensorRT version or GPU
        BackendUnavailable    a network or CRF backend that cannot run here (crf's)
            TensorRTUnavailable
    MemoryError
        OutOfDeviceMemory     the device ran out during a call; the Segmenter stays usable (crf's)
    TimeoutError
        CRFTimeout            a call past its ``timeout`` (crf's)

The last three are crf's own (the CRF raises them too); they are re-exported here so that a user
of the runtime imports every error from one module.
"""
from __future__ import annotations

import numpy as np

from crf.kernel_interface import BackendUnavailable, OutOfDeviceMemory
from crf.features import CRFTimeout

__all__ = ["ImageError", "ImageTooLarge", "ModelFormatError", "SidecarError", "NetworkOutputError",
           "EngineMismatch", "TensorRTUnavailable", "BackendUnavailable", "OutOfDeviceMemory", "CRFTimeout",
           "nonfinite_scores_error"]


class ImageError(ValueError):
    """An input image that cannot be segmented, with the reason."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the limit (``max_pixels``), or one whose segmentation would
    take more memory than the Segmenter's ``memory_budget``: refused before anything large is
    allocated. ``pixels`` and ``limit`` say by how much."""

    def __init__(self, message: str, pixels: int, limit: int):
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


class ModelFormatError(ValueError):
    """A model file that is not a DeepLab graph exported by this toolkit."""


class SidecarError(ModelFormatError):
    """A sidecar that cannot be read or is not about one of our plans (a ModelFormatError, so a
    ValueError: the plan's metadata is malformed as an ONNX model's would be)."""


class NetworkOutputError(ValueError):
    """Scores from the network that cannot be segmented (NaN/inf), naming the image."""


class EngineMismatch(RuntimeError):
    """A plan built for another TensorRT version or GPU; the message says both sides and how to rebuild."""


class TensorRTUnavailable(BackendUnavailable):
    """TensorRT (the real library) cannot be used here; the message says why. A BackendUnavailable
    (a RuntimeError), as every other network or CRF backend that cannot run here: a tool reports
    them all alike."""


def nonfinite_scores_error(name: str, scores: np.ndarray) -> NetworkOutputError:
    """The NetworkOutputError for image ``name`` whose host ``scores`` hold NaN/inf values."""
    bad = int(scores.size - np.count_nonzero(np.isfinite(scores)))
    return NetworkOutputError(f"{name}: the network's scores contain {bad} NaN/inf values (of {scores.size}); "
                              "no labels can be drawn from them")
