"""Runtime API for embedded apps: ``Segmenter``, and ``TritonSegmenter`` for a Triton server (never imports torch)."""
from .contract import ImageError
from .onnx_backend import ModelFormatError, NetworkOutputError
from .segmenter import Segmentation, Segmenter
from .triton_client import TritonSegmenter  # tritonclient itself is imported only when one is made

__all__ = ["Segmenter", "Segmentation", "TritonSegmenter", "ImageError", "ModelFormatError", "NetworkOutputError"]
