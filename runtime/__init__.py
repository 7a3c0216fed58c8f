"""Runtime API for embedded apps: ``Segmenter`` (never imports torch)."""
from .contract import ImageError
from .onnx_backend import ModelFormatError, NetworkOutputError
from .segmenter import Segmentation, Segmenter

__all__ = ["Segmenter", "Segmentation", "ImageError", "ModelFormatError", "NetworkOutputError"]
