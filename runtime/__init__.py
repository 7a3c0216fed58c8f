"""Runtime API for embedded apps: ``Segmenter`` (never imports torch)."""
from .errors import (BackendUnavailable, CRFTimeout, EngineMismatch, ImageError, ImageTooLarge, ModelFormatError,
                     NetworkOutputError, OutOfDeviceMemory, SidecarError, TensorRTUnavailable)
from .limits import SizeLimits
from .result import Segmentation
from .segmenter import Segmenter

__all__ = ["Segmenter", "Segmentation", "SizeLimits", "ImageError", "ImageTooLarge", "ModelFormatError", "SidecarError",
           "NetworkOutputError", "EngineMismatch", "TensorRTUnavailable", "BackendUnavailable", "OutOfDeviceMemory",
           "CRFTimeout"]
