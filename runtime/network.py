"""The network-backend interface (``Network``, ``DeviceNetwork``), and the size policy a backend's
shape limits impose.

Every network backend (``OnnxRuntimeNetwork`` on the CPU or with the CUDA provider,
``TensorRTNetwork``) turns a uint8 N x H x W x 3 BGR batch (padded by the Segmenter) into float32
N x C x H x W class scores: ``__call__(batch)`` returns them on the host. One whose ``kernels`` is
not None is a ``DeviceNetwork``: ``run_into(batch)`` leaves the scores in memory the CRF kernels
address (a ``crf.kernel_interface.Buffer`` of ``kernels``, the CRF's ``KernelBackend``: the one owner of the
pycuda context, the stream, device and pinned buffers), with the upload, the network and everything
the caller launches afterwards ordered on ONE stream, ``kernels.stream`` (the CPU: host memory, in
order). The Buffer is the backend's own and is overwritten by the next call.

ONNX Runtime with its CUDA provider and TensorRT are device backends on the GPU; ONNX Runtime on
the CPU is one when made with CPU kernels (``OnnxRuntimeNetwork(path, kernels=CPUKernels())``:
the same I/O-binding code with host buffers). Device backends are not thread-safe: one call at
a time (the Segmenter holds a lock); each call makes the device's context current in the calling
thread (``kernels.active()``), so any thread may make it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Protocol, Tuple

import numpy as np

from crf.kernel_interface import Buffer, KernelBackend

from .contract import aligned_size, fit_scale
from .errors import ImageError


@dataclass(frozen=True)
class SizeBounds:
    """The input sizes a network runs (TensorRT: its optimisation profile), both ends inclusive."""

    min_batch: int
    min_h: int
    min_w: int
    max_batch: int
    max_h: int
    max_w: int

    def describe(self) -> str:
        return (f"{self.min_h}x{self.min_w} to {self.max_h}x{self.max_w}, batch "
                f"{self.min_batch}..{self.max_batch}")


#: N x C x H x W of a batch's scores
ScoresShape = Tuple[int, int, int, int]


class Network(Protocol):
    """What the Segmenter runs (read-only members: plain attributes of a backend satisfy them)."""

    @property
    def name(self) -> str:
        """"onnxruntime", "onnxruntime-cuda", "tensorrt", ..."""

    @property
    def num_classes(self) -> int: ...

    @property
    def metadata(self) -> Dict[str, str]:
        """The model's ``class_names`` / ``palette`` / ``deeplab_config`` as JSON strings, where known."""

    @property
    def fixed_input_dims(self) -> Tuple[Optional[int], ...]:
        """(N, H, W) where the model fixes them, None per dynamic axis."""

    @property
    def size_bounds(self) -> Optional[SizeBounds]:
        """The input sizes it runs (a TensorRT profile), or None when any size runs."""

    @property
    def kernels(self) -> Optional[KernelBackend]:
        """The CRF kernels whose memory ``run_into`` writes (a DeviceNetwork), or None: host only."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Scores of a uint8 N x H x W x 3 batch, float32 N x C x H x W on the host."""


class DeviceNetwork(Network, Protocol):
    """A Network whose ``kernels`` is not None: it can leave the scores where the CRF reads them."""

    @property
    def kernels(self) -> KernelBackend: ...

    def run_into(self, batch: np.ndarray) -> Tuple[Buffer, ScoresShape]:
        """The scores in a Buffer of ``kernels`` (reused by the next call), and their shape."""


class NetworkSize(NamedTuple):
    scale: float               # 1, or the factor (< 1) the image is shrunk by for the network
    resized: Tuple[int, int]   # (h, w) of the image the network sees, before padding
    padded: Tuple[int, int]    # (h, w) of the network input


def network_size(h: int, w: int, max_size: int, bounds: Optional[SizeBounds] = None,
                 input_size: Optional[Tuple[int, int]] = None) -> NetworkSize:
    """Where an h x w image goes through the network. Today's policy: shrunk (aspect kept) so that
    its longer side is at most ``max_size``, padded bottom/right to the next 8k+1 size (or to
    ``input_size``). Within ``bounds``: shrunk further so that it fits the maximum height and
    width, and padded up to at least the minimum (and never past the maximum: the padded side is
    then not of the 8k+1 form, which the graph runs, only without DeepLab's alignment)."""
    s = fit_scale(h, w, max_size)
    if bounds is not None:
        s = min(s, bounds.max_h / h, bounds.max_w / w)
    nh, nw = h, w
    if s < 1.0:
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if bounds is not None:  # float rounding must not step past the profile
            nh, nw = min(nh, bounds.max_h), min(nw, bounds.max_w)
    if input_size is not None:
        if nh > input_size[0] or nw > input_size[1]:
            raise ImageError(f"image {nh}x{nw} (after max_size shrinking) exceeds input_size {input_size}")
        return NetworkSize(s, (nh, nw), tuple(input_size))  # type: ignore[arg-type]
    ph, pw = aligned_size(nh), aligned_size(nw)
    if bounds is not None:
        ph, pw = min(max(ph, bounds.min_h), bounds.max_h), min(max(pw, bounds.min_w), bounds.max_w)
    return NetworkSize(s, (nh, nw), (ph, pw))


def network_image(image: np.ndarray, size: NetworkSize) -> np.ndarray:
    """The image as the network sees it before padding (what Segmenter and INT8 calibration feed
    it): shrunk to ``size.resized`` with area interpolation when ``size.scale`` < 1, else itself."""
    if size.scale >= 1.0:
        return image
    import cv2

    nh, nw = size.resized
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)


def check_input_size(input_size: Tuple[int, int], bounds: Optional[SizeBounds], source: str) -> None:
    """Refuse a fixed input_size the network cannot take."""
    if bounds is None:
        return
    h, w = input_size
    if not (bounds.min_h <= h <= bounds.max_h and bounds.min_w <= w <= bounds.max_w):
        raise ValueError(f"input_size {h}x{w} is outside what {source} runs ({bounds.describe()})")


def batch_dims(batch: Any) -> Tuple[int, int, int]:
    """(N, H, W) of a network input batch, refused unless it is N x H x W x 3 with N >= 1."""
    if batch.ndim != 4 or batch.shape[3] != 3 or batch.shape[0] < 1:
        raise ValueError(f"expected an N x H x W x 3 uint8 batch of at least one image, got shape {batch.shape}")
    n, h, w = (int(d) for d in batch.shape[:3])
    return n, h, w


def model_metadata(class_names: Optional[list], palette: Optional[list]) -> Dict[str, str]:
    """Metadata as an ONNX model's metadata_props carry it (JSON strings), from a plan's sidecar."""
    meta = {}
    if class_names is not None:
        meta["class_names"] = json.dumps(class_names)
    if palette is not None:
        meta["palette"] = json.dumps(palette)
    return meta
