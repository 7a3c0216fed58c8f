"""The networks an evaluation compares, each behind its own Segmenter without CRF (the CRF is run
by the evaluation from ``result.scores``): ONNX exports (their precision from the metadata),
TensorRT plans, and PyTorch checkpoints run in PyTorch with the same padding and cropping as the
exports (a network backend over ``export.model.DeepLabPipeline``, which takes the raw uint8 BGR
batch as the exported graph does). A contender that cannot run here (TensorRT without TensorRT,
PyTorch without torch) is kept with the reason instead of a Segmenter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Contender:
    name: str
    path: str
    kind: str  # "onnx", "tensorrt" or "pytorch"
    precision: str
    segmenter: object = None  # runtime.Segmenter, or None when skipped
    skipped: str | None = None  # why it cannot run here


class TorchNetwork:
    """A network backend (runtime/network.py) running a checkpoint in PyTorch on the CPU."""

    name = "pytorch"
    fixed_input_dims = (None, None, None)
    size_bounds = None
    kernels = None  # a host backend: scores come back as numpy arrays

    def __init__(self, checkpoint: str | Path):
        import torch

        from export.model import DeepLabPipeline
        from export.weights import load_model
        from runtime.network import model_metadata

        model, meta = load_model(checkpoint)
        self._torch = torch
        self.net = DeepLabPipeline(model).eval()
        self.num_classes = model.config.num_classes
        self.metadata = model_metadata(meta.get("class_names"), meta.get("palette"))
        self.metadata["deeplab_config"] = json.dumps({"num_classes": self.num_classes})

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.net(self._torch.from_numpy(np.ascontiguousarray(batch))).numpy()


def open_model(path: str | Path) -> Contender:
    """An ONNX export or a TensorRT plan. A plan that cannot run here is skipped with the reason;
    an ONNX model that cannot be opened raises (ModelFormatError, FileNotFoundError)."""
    from runtime import Segmenter

    from runtime.backend_choice import is_plan, model_precision

    path = Path(path)
    if is_plan(path):
        precision = model_precision(path)
        try:
            return Contender(path.name, str(path), "tensorrt", precision, Segmenter(path, crf=None))
        except Exception as e:  # TensorRT's own errors, or TensorRTUnavailable: the reason is the message
            return Contender(path.name, str(path), "tensorrt", precision, skipped=" ".join(str(e).split()))
    seg = Segmenter(path, crf=None)
    return Contender(path.name, str(path), "onnx", model_precision(path, seg.network.metadata), seg)


def open_pytorch(checkpoint: str | Path) -> Contender:
    """A checkpoint run in PyTorch (float32); skipped with the reason where torch is not importable."""
    from runtime import Segmenter

    path = Path(checkpoint)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return Contender(path.name, str(path), "pytorch", "fp32", skipped=f"PyTorch is not importable: {e}")
    return Contender(path.name, str(path), "pytorch", "fp32", Segmenter(path, crf=None, network=TorchNetwork(path)))
